"""lm.data.stream: the order of an epoch, each rank's share, resume at the same and at another number of
workers, and reading only a rank's share of the shards (a counting filesystem)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from lm.data.loader import shard_bytes
from lm.data.stream import ArraySplit, HostedStreams, ParquetSplit, RowStream, StreamPosition, read_head


def numbered(n: int, width: int = 3) -> np.ndarray:
    """Rows whose first token is their number."""
    rows = np.zeros((n, width), np.int32)
    rows[:, 0] = np.arange(n)
    return rows


def ids(rows: np.ndarray) -> list[int]:
    return rows[:, 0].tolist()


def take(stream: RowStream, batches: int, size: int) -> list[int]:
    return [i for _ in range(batches) for i in ids(stream.next_rows(size)[0])]


def test_every_row_once_per_epoch_in_a_seeded_order_that_changes_by_epoch():
    split = ArraySplit(numbered(103), unit_rows=10)
    with RowStream(split, seed=5, rank=0, world=1, window_rows=25) as stream:
        epochs = [ids(stream.next_rows(103)[0]) for _ in range(3)]
        assert stream.position().epoch == 3 and stream.position().dropped_rows == 0
    assert all(sorted(e) == list(range(103)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    with RowStream(split, seed=5, rank=0, world=1, window_rows=25) as again:
        assert ids(again.next_rows(103)[0]) == epochs[0]  # a function of (seed, epoch)
    with RowStream(split, seed=6, rank=0, world=1, window_rows=25) as other:
        assert ids(other.next_rows(103)[0]) != epochs[0]


def test_ranks_read_disjoint_equal_pieces_and_the_remainder_is_counted():
    split = ArraySplit(numbered(103), unit_rows=10)
    pieces = []
    for rank in range(3):
        with RowStream(split, seed=1, rank=rank, world=3, window_rows=25) as stream:
            pieces.append(take(stream, 1, 34))  # 103 // 3 rows each; one row is left out
            assert stream.position().epoch == 1 and stream.position().dropped_rows == 1
            assert sorted(take(stream, 1, 34)) != sorted(pieces[-1])  # the next epoch, another share
    seen = [i for p in pieces for i in p]
    assert len(seen) == len(set(seen)) == 102


def test_masks_travel_with_their_rows():
    rows = numbered(40)
    mask = (rows % 2).astype(np.uint8)
    mask[:, 1] = rows[:, 0] % 2
    with RowStream(ArraySplit(rows, mask, unit_rows=7), seed=1, rank=0, world=1, window_rows=8) as stream:
        got, got_mask = stream.next_rows(40)
    assert np.array_equal(got_mask[:, 1], got[:, 0] % 2)
    with RowStream(ArraySplit(rows, unit_rows=7), seed=1, rank=0, world=1) as plain:
        assert plain.next_rows(5)[1] is None


def test_shards_with_and_without_loss_masks(tmp_path):
    rows = numbered(30)
    (tmp_path / "a.parquet").write_bytes(shard_bytes(rows[:20], (rows[:20] % 2).astype(np.uint8), row_group_rows=8))
    (tmp_path / "b.parquet").write_bytes(shard_bytes(rows[20:], row_group_rows=8))
    split = ParquetSplit.of_uris([str(tmp_path / n) for n in ("a.parquet", "b.parquet")],
                                 lambda uri: (pafs.LocalFileSystem(), uri))
    assert split.masked and split.unit_rows == [8, 8, 4, 8, 2]
    with RowStream(split, seed=1, rank=0, world=1, window_rows=8) as stream:
        got, mask = stream.next_rows(30)
    expected = np.where(got[:, :1] < 20, got[:, :1] % 2, 1)  # a shard without a mask: every target counts
    assert sorted(ids(got)) == list(range(30)) and np.array_equal(mask[:, :1], expected)


@pytest.mark.parametrize("batches", [3, 7])  # mid-epoch, and after a batch that straddled two epochs
def test_resume_at_the_same_world_gives_exactly_the_same_rows(batches):
    split = ArraySplit(numbered(50), unit_rows=6)
    for rank in range(2):
        with RowStream(split, seed=2, rank=rank, world=2, window_rows=12) as straight:
            first = take(straight, batches, 4)
            position = StreamPosition.model_validate_json(straight.position().model_dump_json())  # a checkpoint
            rest = take(straight, 10, 4)
        with RowStream(split, seed=2, rank=rank, world=2, window_rows=12, position=position) as resumed:
            assert take(resumed, 10, 4) == rest, (rank, first)


def test_resume_on_another_world_reads_every_unread_row_of_the_epoch_once():
    split = ArraySplit(numbered(101), unit_rows=9)
    streams = [RowStream(split, seed=3, rank=r, world=2, window_rows=20) for r in range(2)]
    before = [i for s in streams for i in take(s, 4, 5)]  # 40 rows read, mid-epoch
    position = streams[0].position()
    for s in streams:
        s.close()
    after, dropped = [], []
    for rank in range(3):
        with RowStream(split, seed=3, rank=rank, world=3, window_rows=20, position=position) as s:
            q = s.position().piece_rows()
            after += take(s, 1, q)
            dropped.append(s.position().dropped_rows)
            assert s.position().epoch == 1
    assert sorted(before + after) == sorted(set(before + after))  # nothing twice
    assert len(before + after) + dropped[0] == 101 and dropped == [dropped[0]] * 3 and dropped[0] <= 2
    with pytest.raises(ValueError, match="other data"):
        RowStream(ArraySplit(numbered(100)), seed=3, rank=0, world=3, position=position)


def test_fewer_rows_than_workers_is_an_error():
    with pytest.raises(ValueError, match="fewer rows than workers"):
        RowStream(ArraySplit(numbered(2)), seed=1, rank=0, world=3)


class CountingFiles(pafs.FileSystemHandler):
    """A local filesystem that counts the bytes each reader reads."""

    def __init__(self):
        self.local, self.bytes_read = pafs.LocalFileSystem(), 0

    def open_input_file(self, path):
        handler = self

        class Counted(pa.PythonFile):
            pass

        raw = open(path, "rb")  # noqa: SIM115 (pyarrow closes it)
        read = raw.read

        def counted_read(n=-1):
            data = read(n)
            handler.bytes_read += len(data)
            return data

        raw.read = counted_read
        return Counted(raw, mode="r")

    def get_type_name(self): return "counting"
    def normalize_path(self, path): return path
    def get_file_info(self, paths): return self.local.get_file_info(paths)
    def get_file_info_selector(self, selector): return self.local.get_file_info(selector)
    def create_dir(self, path, recursive): raise NotImplementedError
    def delete_dir(self, path): raise NotImplementedError
    def delete_dir_contents(self, path, missing_dir_ok=False): raise NotImplementedError
    def delete_root_dir_contents(self): raise NotImplementedError
    def delete_file(self, path): raise NotImplementedError
    def move(self, src, dest): raise NotImplementedError
    def copy_file(self, src, dest): raise NotImplementedError
    def open_input_stream(self, path): return self.open_input_file(path)
    def open_output_stream(self, path, metadata=None): raise NotImplementedError
    def open_append_stream(self, path, metadata=None): raise NotImplementedError


def test_each_rank_reads_about_its_share_of_the_shards(tmp_path):
    rng = np.random.default_rng(0)
    uris = []
    for i in range(8):  # 8 shards x 4 row groups of 64 rows of random (incompressible) tokens
        path = tmp_path / f"train-{i:05d}.parquet"
        path.write_bytes(shard_bytes(rng.integers(0, 2**31 - 1, (256, 129), dtype=np.int32), row_group_rows=64))
        uris.append(str(path))
    total = sum((tmp_path / f"train-{i:05d}.parquet").stat().st_size for i in range(8))
    layout = ParquetSplit.of_uris(uris, lambda uri: (pafs.LocalFileSystem(), uri))
    assert layout.unit_rows == [64] * 32 and read_head(layout, 100)[0].shape == (100, 129)
    world, read = 4, []
    for rank in range(world):
        counting = CountingFiles()
        fs = pafs.PyFileSystem(counting)
        split = ParquetSplit(layout.groups, layout.masked, lambda uri, fs=fs: (fs, uri), layout.footers)
        with RowStream(split, seed=1, rank=rank, world=world, window_rows=128, prefetch=2) as stream:
            stream.next_rows(2048 // world)  # one epoch of this rank
        read.append(counting.bytes_read)
    share = total / world
    # its piece plus, at most, the rest of the two windows (2 row groups each) it starts and ends in
    assert all(b <= share + 2 * 2 * total / 32 for b in read), (read, share)
    assert sum(read) >= total * 0.9


def test_a_world_k_times_smaller_hosts_the_saved_ranks_and_reads_the_same_rows_each_step():
    """2 → 1 worker with twice the micro-batches: every step takes the rows the 2 ranks would have taken
    (across an epoch's end too), and the position stays cut for 2 (resuming it on 2 is exact)."""
    split = ArraySplit(numbered(101), unit_rows=9)
    straight = [RowStream(split, seed=4, rank=r, world=2, window_rows=20) for r in range(2)]
    steps = [[i for s in straight for i in take(s, 2, 5)] for _ in range(14)]  # 2 micro-batches of 5 per rank
    position = StreamPosition(rows=101, world=2, consumed=30)  # after 3 steps
    for s in straight:
        s.close()
    hosted = HostedStreams([RowStream(split, seed=4, rank=r, world=2, window_rows=20, position=position)
                            for r in range(2)])
    for step in steps[3:]:  # 4 micro-batches a step; a piece is 50 rows: epochs end after steps 5 and 10
        assert sorted(i for _ in range(4) for i in ids(hosted.next_rows(5)[0])) == sorted(step)
    assert hosted.position() == StreamPosition(rows=101, epoch=2, world=2, consumed=40, dropped_rows=2)
    hosted.next_rows(5)
    with pytest.raises(RuntimeError, match="between two steps"):
        hosted.position()
    hosted.close()
