"""The storage layer's pyarrow filesystem is what Ray Data reads object storage with."""

import pytest

from lm.config import join_uri

pytestmark = [pytest.mark.ray]


@pytest.mark.parametrize("store_root", ["local", pytest.param("s3", marks=pytest.mark.s3)], indirect=True)
def test_ray_data_reads_through_storage_filesystem(ray_session, store_root):
    store, root = store_root.store, store_root.uri
    lines = [f"line {i} é" for i in range(500)]
    store.write_text(join_uri(root, "corpus", "a.txt"), "\n".join(lines[:250]) + "\n")
    store.write_text(join_uri(root, "corpus", "b.txt"), "\n".join(lines[250:]) + "\n")
    fs, path = store.pyarrow_filesystem(join_uri(root, "corpus"))
    ds = ray_session.data.read_text(path, filesystem=fs)
    assert sorted(row["text"] for row in ds.take_all()) == sorted(lines)
