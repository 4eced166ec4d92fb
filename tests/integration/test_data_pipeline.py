"""`lm data prepare` end to end on Ray Data: real corpora, bad input, reproducibility, the loaders."""

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lm.config import join_uri, load_config
from lm.data.loader import ray_dataset
from lm.data.manifest import read_manifest
from lm.data.pipeline import prepare_data
from lm.data.sources import DataError
from lm.data.stream import ParquetSplit, RowStream, read_head
from lm.storage import ObjectStore, StorageError

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).parents[2]
SHARED = REPO.parent / "shared" / "data"


def config(root: str, sources: str, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", [f"storage.root={root}", f"data.sources={sources}",
                                                     "tokenizer.vocab_size=600", "data.rows_per_shard=200", *extra])


@pytest.fixture(scope="module")
def corpora_s3(s3_server):
    """tinyshakespeare and wikitext-2 uploaded to a bucket, as a user would have them."""
    store = s3_server.store()
    bucket = s3_server.new_bucket("corpora")
    store.write_bytes(f"s3://{bucket}/shakespeare/input.txt.gz",
                      gzip.compress((SHARED / "tinyshakespeare/input.txt").read_bytes()))
    for name in ("valid", "test"):
        store.write_bytes(f"s3://{bucket}/wikitext-2/{name}.txt", (SHARED / f"wikitext-2/{name}.txt").read_bytes())
    return bucket


@pytest.mark.s3
def test_prepare_shakespeare_and_wikitext_from_s3(ray_session, s3_server, corpora_s3):
    root = f"s3://{s3_server.new_bucket('run')}/lm"
    sources = (f"[{{name: shakespeare, uri: 's3://{corpora_s3}/shakespeare/', weight: 2}}, "
               f"{{name: wikitext, uri: 's3://{corpora_s3}/wikitext-2/*.txt', delimiter: \"\\n \\n\", weight: 0.5}}]")
    cfg = config(root, sources, "data.test_fraction=0.05")
    store = s3_server.store(root=root)
    lines: list[str] = []
    manifest = prepare_data(cfg, store, log=lines.append)
    data = join_uri(cfg.run_uri, "data")
    assert read_manifest(store, data) == manifest
    assert set(manifest.splits) == {"train", "val", "test"}
    assert set(manifest.sources) == {"shakespeare", "wikitext"}
    assert manifest.sources["wikitext"].files == 2 and manifest.files == 3
    for name, src in manifest.sources.items():
        assert src.splits["train"].unique_docs > 3 * src.splits["val"].docs > 0, name
        assert src.splits["test"].docs > 0, name
        for split in ("val", "test"):  # mixing weights re-weight train only
            assert src.splits[split].docs == src.splits[split].unique_docs
    # mixing weights: shakespeare (2) twice over, wikitext (0.5) a stable half
    shake, wiki = (manifest.sources[n].splits["train"] for n in ("shakespeare", "wikitext"))
    assert shake.docs == 2 * shake.unique_docs
    assert wiki.docs == wiki.unique_docs  # no copies below weight 1
    val = manifest.sources["wikitext"].splits["val"].docs
    assert 0.35 < wiki.docs / (val * 0.85 / 0.1) < 0.65  # about half the train documents (unweighted: 8.5 x val)
    # every shard is where the manifest says, with its hash, rows of seq_len + 1
    row_len = manifest.row_length
    assert row_len == cfg.model.max_seq_len + 1
    for shard in manifest.shards:
        blob = store.read_bytes(join_uri(data, shard.path))
        assert hashlib.sha256(blob).hexdigest() == shard.sha256
        assert shard.tokens == shard.rows * row_len
    for split, agg in manifest.splits.items():
        shards = [s for s in manifest.shards if s.split == split]
        assert sum(s.tokens + s.dropped_tail_tokens for s in shards) == agg.tokens
        assert sum(s.docs for s in shards) == agg.docs
    # wikitext repeats its " = = Heading = = " lines across files: exact dedup found them
    assert manifest.dedup["exact"] > 0
    tok_blob = store.read_text(join_uri(data, "tokenizer.json"))
    assert hashlib.sha256(tok_blob.encode()).hexdigest()[:16] == manifest.tokenizer.hash
    assert "TOTAL" in manifest.summary_table()  # what `lm data prepare` prints; the job prints one line
    assert lines[-1].startswith("data: train ") and "shards, vocabulary" in lines[-1]
    # the training side reads the same rows from S3 as a Ray Dataset and as its row groups
    rows, _ = read_head(ParquetSplit.open(store, data, "val"), manifest.rows_in("val"))  # a small split
    ds_rows = np.stack([r["tokens"] for r in ray_dataset(store, data, "val").take_all()])
    assert sorted(map(tuple, ds_rows)) == sorted(map(tuple, rows))
    assert rows.shape == (manifest.rows_in("val"), row_len)


def test_bad_input_is_skipped_and_reported(ray_session, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (SHARED / "tinyshakespeare/input.txt").read_text()[:200_000]
    (corpus / "good.txt").write_text(text)
    (corpus / "copy.txt").write_text(text.split("\n\n")[3])  # an exact duplicate of one document
    (corpus / "truncated.txt.gz").write_bytes(gzip.compress(text.encode())[:5000])
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 40)
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, deux fois".encode("latin-1"))
    (corpus / "oneline.txt").write_text("word " * 2_000_000)  # a 10 MB single line
    (corpus / "docs.jsonl").write_text(json.dumps({"text": "a fine document here"}) + "\n"
                                       + json.dumps({"body": "no text field"}) + "\n")
    whole = tmp_path / "whole"  # delimiter null: one document per file, blank lines and all
    whole.mkdir()
    for i in range(2):
        (whole / f"play{i}.txt").write_text(f"Act {i}.\n\nScene one, with its own words.\n\nThe end of {i}.")
    cfg = config(str(tmp_path / "store"), f"[{{name: mixed, uri: '{corpus}'}}, {{name: whole, uri: '{whole}', "
                 "delimiter: null}]", "data.clean.max_chars=20000000",
                 "data.clean.max_duplicate_ngram_fraction=1.0", "data.clean.max_duplicate_line_fraction=1.0")
    lines: list[str] = []
    manifest = prepare_data(cfg, log=lines.append)
    skipped = {(s["source"], Path(s["uri"]).name, s["reason"]) for s in manifest.skipped_objects}
    assert skipped == {("mixed", "truncated.txt.gz", "corrupt_compression"), ("mixed", "binary.txt", "binary"),
                       ("mixed", "empty.txt", "empty")}
    assert sum(e.docs for e in manifest.sources["whole"].splits.values()) == 2
    assert "  mixed: binary=1, corrupt_compression=1, empty=1" in manifest.summary_table().splitlines()
    assert lines[-1].startswith("data: train ") and "; 3 objects skipped → " in lines[-1]  # the job's line
    assert manifest.dropped.get("missing_field") == 1
    assert manifest.dedup["exact"] >= 1
    docs = sum(e.docs for e in manifest.splits.values())
    assert docs > 50  # good.txt's documents, latin1 (replaced), the 10 MB line, the jsonl document
    total_bytes = sum(e.bytes for e in manifest.splits.values())
    assert total_bytes > 10_000_000


def test_rerun_reproduces_manifest_and_skips_when_done(ray_session, tmp_path):
    src = "[{name: ts, uri: 'bundled://tinyshakespeare'}]"
    a = config(str(tmp_path / "store"), src, f"data.output={tmp_path}/a", "data.dedup.near=false")
    b = config(str(tmp_path / "store"), src, f"data.output={tmp_path}/b", "data.dedup.near=false")
    first = prepare_data(a, log=lambda _: None, export_texts=("val",))
    second = prepare_data(b, log=lambda _: None, export_texts=("val",))
    assert first.dumps() == second.dumps()
    # the val texts, streamed into one file by a Ray task in id order: the same bytes from the same inputs
    texts = [(tmp_path / run / "val-texts.jsonl").read_bytes() for run in ("a", "b")]
    records = [json.loads(line) for line in texts[0].decode().splitlines()]
    assert texts[0] == texts[1] and first.texts == {"val": "val-texts.jsonl"}
    assert [r["id"] for r in records] == sorted({r["id"] for r in records})
    assert len(records) == first.splits["val"].docs and all(r["text"] for r in records)
    assert not list(tmp_path.glob("*/tmp-*")) and (tmp_path / "a" / first.index).is_dir()  # scratch deleted
    lines: list[str] = []
    assert prepare_data(a, log=lines.append, export_texts=("val",)) == first
    assert any("up to date" in line for line in lines)
    # the trainers' stream of the shards: seeded epochs, every row once
    split, n = ParquetSplit.open(ObjectStore(), str(tmp_path / "a"), "train"), first.rows_in("train")
    epochs = []
    for _ in range(2):
        with RowStream(split, seed=7, rank=0, world=1, window_rows=64) as stream:
            epochs.append([stream.next_rows(n)[0].tobytes() for _ in range(2)])
    assert epochs[0] == epochs[1] and epochs[0][0] != epochs[0][1] and n == split.rows > 0


# web-like paragraphs for the quality stack: each passes every default filter on its own
PARAGRAPHS = [
    "The city council met on Tuesday evening to discuss the new budget for public libraries. Several members argued "
    "that the proposed cuts would reduce opening hours in the poorest districts, where residents depend on free "
    "internet access. After a long debate, the council agreed to delay the vote until next month.",
    "Farmers in the valley have started to plant earlier in the spring because the last frost now arrives weeks "
    "sooner than it did when their parents worked the same fields. Some of them welcome the longer season, while "
    "others worry about the dry summers that seem to come with it and about the cost of water.",
    "The museum reopened its east wing after two years of careful restoration work on the painted ceilings. Visitors "
    "can now see the original colours, which had been hidden under layers of soot and varnish for more than a "
    "century, and a small exhibition explains how the conservators cleaned every panel by hand.",
    "A group of students built a small weather station on the roof of their school and shared the readings with a "
    "national network of volunteers. Their teacher said that the project taught them more about statistics than "
    "any textbook, because they had to decide what to do with missing or strange values.",
    "The ferry company announced that it will replace its oldest boats with electric ones over the next five years. "
    "The new vessels are quieter and cheaper to run, but the harbour needs a stronger connection to the grid before "
    "they can be charged between crossings, and the town has asked the region to help pay for it.",
]
HELD_OUT = ("Lighthouse keepers on the northern islands once kept detailed diaries of the weather, the passing "
            "ships and the birds that rested on the rocks during the autumn storms, and historians now read them "
            "to learn how the coast has changed over the last two hundred years. The diaries are kept in the town "
            "library, where anyone may ask to see them on weekday mornings.")
BENCH = ("Which of the following best explains why the moon shows phases to an observer standing on the earth "
         "at night, given that half of the moon is always lit by the sun during its orbit around us?")
NOTICE = ("This website uses cookies. By continuing to browse you agree to our cookie policy, our privacy policy and "
          "our terms of use, which you can read in full on the legal page of this website at any time.\n")


def test_quality_stack_counts_by_reason_in_the_manifest(ray_session, tmp_path):
    """Language, heuristic filters, boilerplate lines, PII redaction and decontamination (against a pinned val
    source and an eval set) on web-like text through the Ray Data pipeline, each counted in the manifest."""
    web, held, bench = tmp_path / "web", tmp_path / "held", tmp_path / "bench.txt"
    web.mkdir(), held.mkdir()
    (web / "wiki.txt").write_text((SHARED / "wikitext-2/valid.txt").read_text()[:60_000])  # headings: too few words
    pii = " Write to jane.doe@example.com or call +1 415 555 0132; server 192.168.10.20, card 4111 1111 1111 1111."
    words = HELD_OUT.split()
    pages = [
        PARAGRAPHS[0] + pii + " My key is sk-live0123456789abcdef, do not share it.",
        "Der Stadtrat hat am Dienstagabend lange über den neuen Haushalt der öffentlichen Bibliotheken beraten, "
        "denn viele Mitglieder fürchten, dass die Kürzungen die Öffnungszeiten in den ärmsten Vierteln verringern.",
        "\n".join("- " + " ".join(p.split()[:12]) for p in [*PARAGRAPHS, HELD_OUT[60:], BENCH[40:]]),
        NOTICE * 3 + PARAGRAPHS[1],
        PARAGRAPHS[2] + "\nCopyright 2024 The Museum. All rights reserved.",
        PARAGRAPHS[3] + " As the guide put it, " + " ".join(words[2:17]) + ", which surprised them all.",
        PARAGRAPHS[4] + " The quiz began: " + " ".join(BENCH.split()[:14]) + " and nobody could answer.",
    ]
    (web / "pages.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pages))
    (held / "a.txt").write_text(HELD_OUT)
    bench.write_text(BENCH)
    sources = (f"[{{name: web, uri: '{web}', delimiter: \"\\n \\n\"}}, "
               f"{{name: heldout, uri: '{held}', split: val}}]")
    cfg = config(str(tmp_path / "store"), sources, "data.languages=[en]", "data.quality.enabled=true",
                 "data.val_fraction=0", "data.dedup.near=false",
                 f"eval.sets=[{{name: val, split: val}}, {{name: bench, uri: '{bench}'}}, "
                 f"{{name: later, uri: '{tmp_path}/not-yet/*.jsonl'}}]")  # an eval set not there yet: noted
    lines: list[str] = []
    manifest = prepare_data(cfg, log=lines.append, export_texts=("train",))
    dropped = manifest.sources["web"].dropped
    assert dropped["language"] > 10 and dropped["few_words"] > 0, dropped  # the German page and wikitext's headings
    assert (dropped["bullet_lines"], dropped["boilerplate"], dropped["contaminated"]) == (1, 1, 2), dropped
    assert manifest.dropped["contaminated"] == 2 and "contaminated" not in manifest.sources["heldout"].dropped
    decon = manifest.decontamination
    assert (decon.ngram, decon.against, decon.dropped) == (13, ["val", "test", "eval-bench"], 2) and decon.ngrams > 0
    assert decon.skipped == ["eval-later"]
    redacted = {"card": 1, "email": 1, "ip": 1, "phone": 1, "secret": 1}
    assert manifest.redacted == manifest.sources["web"].redacted == redacted
    assert manifest.lines_removed == manifest.sources["web"].lines_removed == 1
    assert manifest.splits["val"].docs == 1 and manifest.splits["train"].docs > 20
    texts = (Path(cfg.data_uri) / "train-texts.jsonl").read_text()
    for raw in ("jane.doe@example.com", "415 555 0132", "192.168.10.20", "4111 1111", "sk-live", "Copyright 2024",
                "Lighthouse", "moon shows"):
        assert raw not in texts, raw
    assert all(p in texts for p in ("<EMAIL>", "<PHONE_NUMBER>", "<IP_ADDRESS>", "<CARD_NUMBER>", "<API_KEY>"))
    summary = manifest.summary_table()  # what `lm data prepare` prints
    assert "redacted: card=1, email=1, ip=1, phone=1, secret=1; boilerplate lines removed: 1" in summary
    assert "decontamination: 2 train documents share a 13-gram with val, test, eval-bench" in summary


def test_nothing_is_written_for_bad_sources(ray_session, tmp_path):
    store_root = tmp_path / "store"
    with pytest.raises(DataError, match="nothing-here"):
        prepare_data(config(str(store_root), f"[{{name: x, uri: '{tmp_path}/nothing-here/*.txt'}}]"))
    only_short = tmp_path / "short"
    only_short.mkdir()
    (only_short / "a.txt").write_text("hi\n\nyo")
    with pytest.raises(DataError, match=r"source 's': no document in its 1 files .*'too_short': 2"):
        prepare_data(config(str(store_root), f"[{{name: s, uri: '{only_short}'}}]", "data.clean.min_chars=50"))
    # a source of only bad objects fails the run, naming it, even beside a good source
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    (good / "a.txt").write_text((SHARED / "tinyshakespeare/input.txt").read_text()[:20_000])
    (bad / "x.txt.gz").write_bytes(b"\x1f\x8b not gzip at all")
    (bad / "y.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"source 'broken': no document in its 2 files \(2 objects skipped: "
                                        r"\{'corrupt_compression': 1, 'empty': 1\}"):
        prepare_data(config(str(store_root), f"[{{name: good, uri: '{good}'}}, {{name: broken, uri: '{bad}'}}]"))
    assert not store_root.exists() or not any(p.is_file() for p in store_root.rglob("*"))


@pytest.mark.s3
def test_missing_bucket_fails_before_work(ray_session, s3_server):
    cfg = config("s3://no-such-bucket-here/x", "[{name: x, uri: 's3://no-such-bucket-here/corpus/'}]")
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        prepare_data(cfg, s3_server.store())
