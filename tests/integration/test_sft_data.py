"""`data.format: sft` through the Ray Data pipeline, on a local folder and on S3: prompt / response JSONL
(plain and gzip) → masked shards (whole examples per row, loss on the response and end-of-text only) and
a manifest that counts bad records and objects by reason, tokenized with the init_from model's tokenizer."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lm import chat
from lm.config import TokenizerConfig, join_uri, load_config
from lm.data.manifest import read_manifest
from lm.data.pipeline import prepare_data
from lm.data.stream import ParquetSplit, read_head
from lm.eval.sets import split_rows
from lm.tokenizer import train_tokenizer

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).parents[2]
WORDS = ["thou", "art", "more", "lovely", "and", "more", "temperate", "rough", "winds", "do", "shake", "the",
         "darling", "buds", "of", "may"]


def test_prepare_sft_records_into_masked_shards(ray_session, store_root):
    store, root = store_root.store, store_root.uri
    rng = np.random.default_rng(0)
    good = [{"prompt": " ".join(rng.choice(WORDS, size=6)), "response": " ".join(rng.choice(WORDS, size=3)),
             **({"system": "Be brief."} if i % 3 == 0 else {})} for i in range(60)]
    bad = ["{not json", "[1]", json.dumps({"prompt": "p"}), json.dumps({"prompt": "p", "response": 3}),
           json.dumps({"prompt": "", "response": "r"}), json.dumps({"prompt": "long", "response": "x " * 200})]
    lines = [json.dumps(r) for r in good[:40]] + bad + [json.dumps(good[0])]  # + an exact duplicate
    store.write_text(join_uri(root, "sft/a.jsonl"), "\n".join(lines) + "\n")
    store.write_bytes(join_uri(root, "sft/b.jsonl.gz"),
                      gzip.compress("".join(json.dumps(r) + "\n" for r in good[40:]).encode()))
    store.write_bytes(join_uri(root, "sft/c.jsonl.gz"), gzip.compress(b'{"prompt": "a", "response": "b"}\n' * 50)[:30])
    store.write_bytes(join_uri(root, "sft/d.jsonl"), b"")
    tok = train_tokenizer(iter([" ".join(WORDS)] * 50 + ["System: User: Assistant:"] * 50),
                          TokenizerConfig(vocab_size=300))
    store.write_text(join_uri(root, "model/tokenizer.json"), tok.to_json())  # what train.init_from points at
    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={root}", "data.format=sft", "data.val_fraction=0.2",
                                                   f"data.sources=[{{name: qa, uri: '{join_uri(root, 'sft/')}'}}]",
                                                   f"train.init_from={join_uri(root, 'model')}",
                                                   "data.dedup.near=false"])
    manifest = prepare_data(cfg, store, log=lambda _: None)
    data = join_uri(cfg.run_uri, "data")
    assert read_manifest(store, data) == manifest and manifest.kind == "sft"
    assert manifest.tokenizer.hash == tok.fingerprint()  # the model's tokenizer, not a new one
    assert manifest.dropped == {"bad_json_line": 1, "not_an_object": 1, "missing_field": 1, "wrong_type": 1,
                                   "empty_field": 1, "longer_than_row": 1}
    assert {(Path(s["uri"]).name, s["reason"]) for s in manifest.skipped_objects} == {
        ("c.jsonl.gz", "corrupt_compression"), ("d.jsonl", "empty")}
    assert manifest.dedup["exact"] == 1
    assert sum(e.docs for e in manifest.splits.values()) == len(good)
    assert set(manifest.splits) == {"train", "val"}

    expected = {chat.sft_prompt(r["prompt"], r.get("system")) + chat.assistant_reply(r["response"]) for r in good}
    found, loss_tokens = set(), 0
    for split in ("train", "val"):
        rows, mask = read_head(ParquetSplit.open(store, data, split), manifest.rows_in(split))  # small
        assert rows.shape[1] == manifest.row_length == 65 and mask.shape == rows.shape
        assert sum(s.loss_tokens for s in manifest.shards if s.split == split) == mask.sum()
        loss_tokens += int(mask.sum())
        for row, m in zip(rows, mask, strict=True):
            assert m[0] == 0 and (m[row == tok.pad_id] == 0).all()  # a row starts with a prompt; padding has no loss
            examples = tok.decode(row[row != tok.pad_id].tolist()).split(tok.eos_token)
            assert examples[-1] == ""  # whole examples only, each ending in end-of-text
            found.update(examples[:-1])
            replies = tok.decode(row[m == 1].tolist()).split(tok.eos_token)[:-1]
            assert replies == [" " + e.split("\n\nAssistant: ", 1)[1] for e in examples[:-1]]
    assert found == expected
    assert loss_tokens == sum(e.tokens for e in manifest.splits.values())
    # lm eval scores these rows on their responses, as training does; the n-gram fits on every token
    scored = split_rows(store, cfg, "val", tok, cfg.seq_len)
    _, val_mask = read_head(ParquetSplit.open(store, data, "val"), manifest.rows_in("val"))
    pieces = list(scored.pieces)  # small: the test's few rows
    got = np.concatenate([p.loss_mask for p in pieces])
    assert scored.masked and got[:, 1:].sum() == val_mask[:, 1:].sum()
    every_token = split_rows(store, cfg, "val", tok, cfg.seq_len, every_token=True)
    every = np.concatenate([p.rows for p in every_token.pieces])
    assert (every >= 0).all() and len(every) == len(got)
