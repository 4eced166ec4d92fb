"""Supervised fine-tuning data without Ray: the chat template shared with Serve, records → examples whose
loss covers the response and end-of-text only, bad records counted by reason, padded packing, the shard
writer, the bundled set, the config rules, and a short training run that learns responses, not prompts."""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa
import pytest
import torch

from lm import chat
from lm.config import CleanConfig, Config, ConfigError, StorageConfig, load_config
from lm.config.sft import SFTConfig
from lm.data.loader import read_shard_masked
from lm.data.pack import pack_examples
from lm.data.pipeline import init_tokenizer, settings_hash
from lm.data.sft import SFTTokenizeActor, parse_record, read_records, write_sft_shard
from lm.data.sft_shakespeare import OUTPUT, jsonl_gz, records, speeches
from lm.data.sources import DataError, plan_files, read_file_task
from lm.serve import schemas
from lm.storage import ObjectStore
from lm.train.local import estimate_loss, train_local

SFT, CLEAN = SFTConfig(), CleanConfig()


def test_records_render_as_servings_chat_template_and_mask_only_the_reply(small_tokenizer):
    request = schemas.ChatRequest(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "Who speaks?\nO Romeo"}])
    prompt, reply, reason, _ = parse_record(json.dumps({"system": "Be brief.", "prompt": "Who speaks?\nO Romeo",
                                                        "response": "  JULIET\n"}), SFT, CLEAN)
    assert reason == "" and prompt == schemas.chat_prompt(request.messages) == (
        "System: Be brief.\n\nUser: Who speaks?\nO Romeo\n\nAssistant:")
    assert reply == " JULIET" and schemas.CHAT_STOPS == chat.CHAT_STOPS
    no_system = parse_record(json.dumps({"prompt": "Hi", "response": "Hello", "system": ""}), SFT, CLEAN)
    assert no_system[0] == "User: Hi\n\nAssistant:"
    default = parse_record(json.dumps({"q": "Hi", "a": "Hello"}), SFTConfig(
        prompt_field="q", response_field="a", system_field=None, default_system="Be kind."), CLEAN)
    assert default[:2] == ("System: Be kind.\n\nUser: Hi\n\nAssistant:", " Hello")

    tok = small_tokenizer
    ids, mask = chat.sft_tokens(tok, prompt, reply)
    n = len(tok.encode(prompt))
    assert ids == [*tok.encode(prompt), *tok.encode(" JULIET"), tok.eos_id]
    assert mask == [0] * n + [1] * (len(ids) - n)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == " JULIET" + tok.eos_token


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path):
    lines = [json.dumps({"prompt": "a", "response": "b"}), "{not json", "[1, 2]", json.dumps({"prompt": "a"}),
             json.dumps({"prompt": "a", "response": 7}), json.dumps({"prompt": "  ", "response": "b"}),
             json.dumps({"prompt": "a", "response": "b", "system": ["x"]}), '{"prompt": "\\ud800", "response": "b"}',
             json.dumps({"prompt": "ok", "response": "fine", "system": None}), ""]
    reasons = [parse_record(line, SFT, CLEAN)[2] for line in lines[:-1]]
    assert reasons == ["", "bad_json_line", "not_an_object", "missing_field", "wrong_type", "empty_field",
                       "wrong_type", "invalid_utf8", ""]
    # the read step, on real files through lm.data.sources (a bad file is one skipped object, never a crash)
    (tmp_path / "good.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode())[:40])
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    cfg = load_config(None, ["data.format=sft", f"data.sources=[{{name: qa, uri: '{tmp_path}'}}]"])
    files = plan_files(store, cfg.data)
    read = partial(read_file_task, filesystem_factory=store.pyarrow_filesystem, clean=CLEAN, max_file_bytes=2**20)
    batch = {k: [f[k] for f in files] for k in files[0]}
    rows = [dict(zip(b, values, strict=True)) for b in read_records(batch, read=read, sft=SFT, clean=CLEAN,
                                                                   split={"val_fraction": 0.5})
            for values in zip(*b.values(), strict=True)]
    assert Counter(r["reason"] for r in rows) == Counter({"": 2, "bad_json_line": 1, "not_an_object": 1,
                                                         "missing_field": 1, "wrong_type": 2, "empty_field": 1,
                                                         "invalid_utf8": 1, "corrupt_compression": 1})
    kept = [r for r in rows if not r["reason"]]
    assert [r["text"] for r in kept] == ["User: a\n\nAssistant: b", "User: ok\n\nAssistant: fine"]
    assert ([r["id"] for r in kept] == ["qa/good.jsonl#0", "qa/good.jsonl#8"]
            and {r["split"] for r in kept} <= {"train", "val"})


def test_padded_packing_never_splits_an_example():
    examples = [([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]), ([8, 9], [0, 1])]
    rows, mask, dropped = pack_examples(examples, seq_len=5, pad_id=0)
    assert rows.tolist() == [[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]] and dropped == 0
    assert mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 1]]
    assert pack_examples(examples, seq_len=5)[0].tolist() == [[1, 2, 3, 4, 5, 6]]  # unpadded: straddles
    with pytest.raises(ValueError, match="example 0 has 3 tokens"):
        pack_examples(examples, seq_len=1, pad_id=0)


def test_tokenize_and_write_steps_make_masked_shards(small_tokenizer, tmp_path):
    tok = small_tokenizer
    prompts = [chat.sft_prompt(f"Say {w}") for w in ("one", "two", "three")]
    batch = {"id": np.array(["s/a#0", "s/a#1", "s/a#2"]), "source": np.array(["s"] * 3),
             "split": np.array(["train", "train", "val"]), "prompt": np.array(prompts),
             "reply": np.array([" one", " two", " three" * 40])}
    table = SFTTokenizeActor(tok.to_json(), {"s": 2.0}, seq_len=32)(batch)
    assert table.column("reason").to_pylist() == ["", "", "", "", "longer_than_row"]  # train rows twice (weight 2)
    assert table.column("id").to_pylist()[:4] == ["s/a#0", "s/a#0~1", "s/a#1", "s/a#1~1"]
    assert table.column("n_tokens").to_pylist()[:2] == [len(tok.encode(" one")) + 1] * 2
    kept = table.filter(pa.compute.equal(table.column("reason"), "")).to_pydict()
    group = {"id": np.array(kept["id"]), "split": np.array(kept["split"]), "bucket": np.zeros(4, dtype=int),
             "tokens": np.array([np.array(t) for t in kept["tokens"]], dtype=object),
             "mask": np.array([np.array(m) for m in kept["mask"]], dtype=object)}
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    out = write_sft_shard(group, out_dir=str(tmp_path / "shards"), fs_factory=store.pyarrow_filesystem, seq_len=32,
                          pad_id=tok.pad_id)
    rows, mask = read_shard_masked(store, str(tmp_path / "shards" / out["path"][0]))
    assert rows.shape == (out["rows"][0], 33) and mask.sum() == out["loss_tokens"][0] == sum(kept["n_tokens"])
    assert rows[mask == 0].tolist().count(tok.pad_id) > 0
    learned = tok.decode(rows[mask == 1].tolist())
    assert learned == (" one" + tok.eos_token) * 2 + (" two" + tok.eos_token) * 2


def test_bundled_set_is_deterministic_small_and_readable():
    plays = gzip.decompress((OUTPUT.parent / "tinyshakespeare.txt.gz").read_bytes()).decode()
    first, again = records(plays), records(plays)
    assert first == again and jsonl_gz(first) == jsonl_gz(again)
    assert gzip.decompress(OUTPUT.read_bytes()) == gzip.decompress(jsonl_gz(first))  # the committed file is current
    assert 2000 < len(first) < 10_000 and OUTPUT.stat().st_size < 1_000_000
    kinds = Counter(r["prompt"].split("\n", 1)[0].split()[0] for r in first)
    assert set(kinds) == {"Who", "Continue"} and min(kinds.values()) > 1000
    who = next(r for r in first if r["prompt"].startswith("Who"))
    assert who["response"] in {s for s, _ in speeches(plays)}
    store = ObjectStore()
    assert store.exists("bundled://sft-shakespeare") and "bundled://sft-shakespeare" in store.list("bundled://")
    cfg = load_config("configs/sft-shakespeare.yaml")
    [task] = plan_files(store, cfg.data)
    assert (task["format"], task["compression"]) == ("jsonl", "gzip")


def test_sft_config_rules_and_the_models_tokenizer(tmp_path, small_tokenizer):
    with pytest.raises(ConfigError, match="sources \\['p'\\] declare another format"):
        load_config(None, ["data.format=sft", "data.sources=[{name: p, uri: x, format: parquet}]"])
    with pytest.raises(ConfigError, match=r"feedback_as text needs data\.format text"):
        load_config(None, ["data.format=sft", "continual.feedback_as=text"])
    with pytest.raises(ConfigError, match="must differ"):
        load_config(None, ["data.sft.response_field=prompt"])
    # text data keeps its settings hash; SFT settings shape SFT data only
    assert settings_hash(Config()) == settings_hash(load_config(None, ["data.sft.prompt_field=q"]))
    sft = load_config(None, ["data.format=sft"])
    assert settings_hash(sft) != settings_hash(load_config(None, ["data.format=sft", "data.sft.prompt_field=q"]))
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    with pytest.raises(DataError, match=re.escape(f"train.init_from={tmp_path}/nope is not a model directory")):
        init_tokenizer(store, f"{tmp_path}/nope")
    store.write_text(f"{tmp_path}/model/config.json", "{}")
    with pytest.raises(DataError, match=r"has no tokenizer\.json"):
        init_tokenizer(store, f"{tmp_path}/model")
    store.write_text(f"{tmp_path}/model/tokenizer.json", small_tokenizer.to_json())
    assert init_tokenizer(store, f"{tmp_path}/model").fingerprint() == small_tokenizer.fingerprint()
    relative = load_config(None, ["train.init_from=runs/x/model"]).with_absolute_paths()
    assert relative.train.init_from.startswith("/") and relative.train.init_from.endswith("/runs/x/model")


def test_training_on_sft_rows_learns_responses_not_prompts(small_tokenizer, small_model, one_torch_thread):
    """Prompts are random letters in the chat template, the response a fixed phrase: after training on the
    masked rows the response loss has collapsed, the loss on prompt positions has not moved down."""
    tok = small_tokenizer
    rng = np.random.default_rng(0)
    lines = [json.dumps({"prompt": "".join(rng.choice(list("abcdefghij"), size=12)), "response": "To be, or not."})
             for _ in range(200)]
    examples = [chat.sft_tokens(tok, *parse_record(line, SFT, CLEAN)[:2]) for line in lines]
    rows, mask, _ = pack_examples(examples, 48, pad_id=tok.pad_id)
    prompt_only = ((1 - mask) * (rows != tok.pad_id)).astype(np.uint8)  # prompt tokens, not padding
    cfg = Config(train={"batch_size": 16, "max_steps": 120, "warmup_steps": 5, "lr": 3e-3, "eval_batches": 4,
                        "log_interval": 100, "device": "cpu"})
    model = small_model(tok, max_seq_len=48).train()
    cpu = torch.device("cpu")
    before = {"response": estimate_loss(model, rows, cfg, cpu, mask),
              "prompt": estimate_loss(model, rows, cfg, cpu, prompt_only)}
    train_local(cfg, model, rows, log=lambda _: None, train_mask=mask)
    after = {"response": estimate_loss(model, rows, cfg, cpu, mask),
             "prompt": estimate_loss(model, rows, cfg, cpu, prompt_only)}
    assert after["response"] < 1.0 < before["response"] - 3, (before, after)
    assert after["prompt"] > before["prompt"] - 0.5, (before, after)


def test_continual_replay_of_sft_data_keeps_its_loss_masks(tmp_path, small_tokenizer, write_manifest):
    from lm.continual.increment import _replay
    from lm.data.loader import shard_bytes

    cfg = load_config(None, [f"storage.root={tmp_path}", "data.format=sft", "continual.replay_ratio=0.5"])
    store = ObjectStore(cfg.storage)
    rows = np.arange(20, dtype=np.int32).reshape(4, 5)
    mask = np.tile(np.array([0, 0, 1, 1, 0], dtype=np.uint8), (4, 1))
    data = f"{tmp_path}/runs/default/data"
    store.write_bytes(f"{data}/train.parquet", shard_bytes(rows, mask))
    write_manifest(store, data, [{"path": "train.parquet", "split": "train", "rows": 4}], small_tokenizer, 4)
    replay = _replay(cfg, store, f"{tmp_path}/mix", small_tokenizer, new_rows=3)
    got_rows, got_mask = read_shard_masked(store, replay.path)
    assert replay.rows == len(got_rows) == 3 and set(map(tuple, got_rows.tolist())) <= set(map(tuple, rows.tolist()))
    assert got_mask is not None and (got_mask == mask[:3]).all()
