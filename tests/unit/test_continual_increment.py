"""The pieces of a continual-learning iteration that need no Ray: dedup against an existing corpus,
shards with loss masks and a manifest of shards by URI, training on the response only, feedback
joined across log files, replay rows read only from the row groups holding them, and the configs of
the fine-tune and the gate."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lm.config import Config, ConfigError, DedupConfig, StorageConfig, load_config
from lm.continual.feedback import Pair, sft_tokens
from lm.continual.increment import feedback_pairs, is_feedback, list_inputs, replay_rows, write_sft
from lm.continual.iteration import fine_tune_config, gate_config, iteration_uri
from lm.data.clean import text_hash
from lm.data.dedup import INDEX_KNOWN_EXACT, INDEX_KNOWN_NEAR, CorpusIndex, index_rows
from lm.data.loader import shard_bytes
from lm.data.pack import pack_examples
from lm.data.stream import ParquetSplit, read_head
from lm.storage import ObjectStore
from lm.train.local import estimate_loss, train_local

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wise", "kings",
         "count", "golden", "stars", "above", "silent", "rivers", "and", "old", "sailors", "sing", "of", "distant",
         "harbours", "under", "pale", "autumn", "moons"]


def text(seed: int, n: int = 60) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n))


def test_corpus_index_finds_exact_and_near_copies_of_indexed_documents():
    cfg = DedupConfig()
    corpus = [text(i) for i in range(20)]
    table = index_rows({"hash": np.array([text_hash(t) for t in corpus]), "text": np.array(corpus, dtype=object)}, cfg)
    index = CorpusIndex.from_tables([table], cfg)
    assert len(index) == 20
    near = corpus[3].split()
    near[10] = "zebra"  # one word of sixty changed
    candidates = [corpus[5], " ".join(near), text(99)]
    assert index.known([text_hash(t) for t in candidates], candidates) == [INDEX_KNOWN_EXACT, INDEX_KNOWN_NEAR, ""]
    exact_only = DedupConfig(near=False)
    plain = CorpusIndex.from_tables([index_rows({"hash": np.array([text_hash(t) for t in corpus]),
                                                 "text": np.array(corpus, dtype=object)}, exact_only)], exact_only)
    assert plain.known([text_hash(t) for t in candidates], candidates) == [INDEX_KNOWN_EXACT, "", ""]


def test_a_split_reads_masks_and_shards_named_by_uri(tmp_path, small_tokenizer, write_manifest):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    rows_a = np.arange(12, dtype=np.int32).reshape(2, 6)
    rows_b = np.arange(100, 118, dtype=np.int32).reshape(3, 6)
    mask_b = np.zeros((3, 6), dtype=np.uint8)
    mask_b[:, 3:] = 1
    store.write_bytes(f"{tmp_path}/data/a.parquet", shard_bytes(rows_a))
    store.write_bytes(f"{tmp_path}/elsewhere/b.parquet", shard_bytes(rows_b, mask_b))
    shards = [{"path": "a.parquet", "split": "train", "rows": 2},
              {"path": f"{tmp_path}/elsewhere/b.parquet", "split": "train", "rows": 3}]
    write_manifest(store, f"{tmp_path}/data", shards, small_tokenizer, 5)
    rows, mask = read_head(ParquetSplit.open(store, f"{tmp_path}/data", "train"), 5)
    assert rows.tolist() == [*rows_a.tolist(), *rows_b.tolist()]
    assert mask.tolist() == [[1] * 6, [1] * 6, *mask_b.tolist()]
    write_manifest(store, f"{tmp_path}/data", shards[:1], small_tokenizer, 5)
    assert read_head(ParquetSplit.open(store, f"{tmp_path}/data", "train"), 5)[1] is None


def test_a_loss_mask_trains_the_response_and_not_the_prompt(small_tokenizer, small_model, one_torch_thread):
    """Prompts are random letters, responses a fixed phrase: with the mask the model learns the response
    as well as without it, but not the prompts, which it is never asked to predict."""
    tok = small_tokenizer
    rng = np.random.default_rng(0)
    pairs = [Pair("".join(rng.choice(list("abcdefghij"), size=12)) + "\n", "To be, or not to be.", "rated", str(i))
             for i in range(200)]
    rows, mask, _ = pack_examples((sft_tokens(tok, p) for p in pairs), 32)
    cfg = Config(train={"batch_size": 16, "max_steps": 150, "warmup_steps": 5, "lr": 3e-3, "eval_batches": 4,
                        "log_interval": 100, "device": "cpu"})
    prompt_only = (1 - mask).astype(np.uint8)
    losses = {}
    for name, train_mask in (("masked", mask), ("unmasked", None)):
        model = small_model(tok, max_seq_len=32).train()
        train_local(cfg, model, rows, log=lambda _: None, train_mask=train_mask)
        losses[name] = {"response": estimate_loss(model, rows, cfg, torch.device("cpu"), mask),
                        "prompt": estimate_loss(model, rows, cfg, torch.device("cpu"), prompt_only)}
    assert losses["masked"]["response"] < 1.0 and losses["unmasked"]["response"] < 1.0
    assert losses["masked"]["prompt"] > losses["unmasked"]["prompt"] + 1.0, losses


def test_feedback_on_a_completion_logged_earlier_is_joined_with_it(tmp_path):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    old, new = f"{cfg.feedback_uri}/2026-11-26/a.jsonl", f"{cfg.feedback_uri}/2026-11-27/b.jsonl"
    store.write_text(old, json.dumps({"type": "completion", "id": "c1", "prompts": ["Q:"],
                                      "completions": [" A"]}) + "\n")
    store.write_text(new, "\n".join([json.dumps({"type": "feedback", "id": "c1", "correction": " Better."}),
                                     json.dumps({"type": "completion", "id": "c2", "prompts": ["P:"],
                                                 "completions": [" B"]}),
                                     json.dumps({"type": "feedback", "id": "c2", "rating": 1}), "not json"]))
    pairs, counts = feedback_pairs(cfg, store, [new], [old])
    assert [(p.prompt, p.response, p.source) for p in pairs] == [("P:", " B", "rated"),
                                                                 ("Q:", " Better.", "correction")]
    assert counts["skipped: not JSON"] == 1
    assert is_feedback(cfg, new) and not is_feedback(cfg, f"{tmp_path}/incoming/x.txt")
    assert set(list_inputs(cfg, store)) == {old, new}  # no corpus configured: the feedback logs only


def test_fine_tune_and_gate_configs(tmp_path):
    cfg = load_config(None, [f"storage.root={tmp_path}", "continual.steps=25", "continual.lr=2e-4",
                             "train.eval_interval=100", "train.max_seconds=5"])
    ft = fine_tune_config(cfg, 3, f"{tmp_path}/mix", f"{tmp_path}/model")
    assert ft.run_uri == iteration_uri(cfg, 3) == f"{tmp_path}/registry/continual/runs/i000003"
    assert (ft.train.init_from, ft.train.max_steps, ft.train.lr, ft.train.eval_interval, ft.train.max_seconds) == (
        f"{tmp_path}/model", 25, 2e-4, 25, None)
    assert ft.data.output == f"{tmp_path}/mix"
    gate = gate_config(cfg, 3, f"{tmp_path}/new.jsonl")
    assert [s.name for s in gate.eval.sets] == ["fixed", "new"] and gate.eval.sets[1].uri == f"{tmp_path}/new.jsonl"
    assert gate.data.output == f"{tmp_path}/runs/default/data"  # the original data's validation split
    assert [r.key for r in gate.eval.compare] == ["fixed/bpb", "new/bpb"]


def test_continual_config_is_checked():
    with pytest.raises(ConfigError, match="unknown sets"):
        load_config(None, ["continual.gate=[{set: val, metric: bpb, max_regression: 0.1}]"])
    with pytest.raises(ConfigError, match="replay_ratio"):
        load_config(None, ["continual.replay_ratio=1"])


def test_shard_bytes_round_trip_types():
    import io

    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(shard_bytes(np.ones((2, 4), np.int32), np.zeros((2, 4), np.uint8))))
    assert table.schema.field("tokens").type == pa.list_(pa.int32(), 4)
    assert table.schema.field("loss_mask").type == pa.list_(pa.uint8(), 4)


class CountedSplit(ParquetSplit):
    """A real ParquetSplit that notes which row groups it reads."""

    def read(self, i):
        self.reads = [*getattr(self, "reads", []), i]
        return super().read(i)


def test_replay_reads_only_the_row_groups_holding_its_seeded_picks(tmp_path):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    rows = np.repeat(np.arange(120, dtype=np.int32)[:, None], 5, axis=1)  # every token: the row's number
    mask = (rows % 3 == 0).astype(np.uint8)
    store.write_bytes(f"{tmp_path}/a.parquet", shard_bytes(rows[:100], mask[:100], row_group_rows=2))
    store.write_bytes(f"{tmp_path}/b.parquet", shard_bytes(rows[100:], row_group_rows=2))  # no loss mask
    uris = [f"{tmp_path}/a.parquet", f"{tmp_path}/b.parquet"]
    split = CountedSplit.of_uris(uris, store.pyarrow_filesystem)
    got, got_mask = replay_rows(split, 7, seed=3)
    picks = got[:, 0]
    assert len(picks) == len(set(picks.tolist())) == 7 and np.array_equal(got, rows[picks])
    assert np.array_equal(got_mask, np.where(picks[:, None] < 100, mask[picks], 1))  # ones for the unmasked shard
    assert split.reads == sorted(set((picks // 2).tolist()))  # 60 row groups; only those holding a pick, once
    again = ParquetSplit.of_uris(uris, store.pyarrow_filesystem)
    assert np.array_equal(replay_rows(again, 7, seed=3)[0], got)  # the seed decides
    assert not np.array_equal(replay_rows(again, 7, seed=4)[0], got)
    more, _ = replay_rows(again, 150, seed=3)  # more than the split holds: with replacement
    assert len(more) == 150 and set(more[:, 0].tolist()) <= set(range(120))


def test_watch_repeats_iterations_and_outlives_a_failed_one(tmp_path, capsys):
    """Nothing new: each iteration says so and claims nothing; an empty registry with no run model to
    start from is a clear error (exit 2 from `lm continual`), and --watch keeps going after it."""
    from lm.cli import main
    from lm.continual.iteration import continual_uri, watch
    from lm.continual.ledger import Ledger
    from lm.registry import Registry

    cfg = load_config(None, [f"storage.root={tmp_path}", "continual.interval_s=0.01"])
    store = ObjectStore(cfg.storage)
    assert main(["continual", f"storage.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"the registry at {cfg.registry_uri} is empty and there is no model at {tmp_path}/runs/default/model" in err
    lines: list[str] = []
    watch(cfg, store, lines.append, iterations=2)
    assert [line.split(":")[0] for line in lines] == ["continual", "continual"]
    assert all("iteration failed: RegistryError" in line for line in lines), lines
    registry = Registry(store, cfg.registry_uri)
    registry.promote(registry.register(f"{tmp_path}/some/model").id)
    lines.clear()
    watch(cfg, store, lines.append, iterations=3)
    assert lines == ["continual: nothing new since the last iteration"] * 3
    assert Ledger(store, continual_uri(cfg)).iterations() == []


def test_feedback_pairs_pack_whole_examples_per_row_and_long_ones_are_counted(tmp_path, small_tokenizer):
    tok = small_tokenizer
    cfg = load_config("configs/tiny.yaml", [f"storage.root={tmp_path}", "data.val_fraction=0.0"])  # seq_len 64
    rng = np.random.default_rng(0)
    pairs = [Pair(f"{text(i, int(rng.integers(2, 6)))}\n", text(100 + i, int(rng.integers(1, 6))), "correction",
                  f"p{i}") for i in range(30)]
    pairs.append(Pair(text(999, 80), "far too long for one row", "correction", "long"))
    shards, too_long = write_sft(cfg, ObjectStore(cfg.storage), f"{tmp_path}/mix", tok, pairs)
    examples = [sft_tokens(tok, p) for p in pairs[:-1]]
    assert max(len(ids) for ids, _ in examples) <= cfg.seq_len + 1 < len(sft_tokens(tok, pairs[-1])[0])
    assert too_long == 1 and set(shards) == {"train"}
    table = pq.read_table(shards["train"].path)
    rows = np.array(table["tokens"].to_pylist())
    mask = np.array(table["loss_mask"].to_pylist())
    # each row is whole examples, in order, then padding without loss: no example straddles two rows
    at = 0
    for row, row_mask in zip(rows, mask, strict=True):
        used = 0
        while at < len(examples) and used + len(examples[at][0]) <= len(row):
            ids, m = examples[at]
            assert row[used : used + len(ids)].tolist() == ids and row_mask[used : used + len(ids)].tolist() == m
            used, at = used + len(ids), at + 1
        assert used > 0 and (row[used:] == tok.pad_id).all() and not row_mask[used:].any()
    assert at == len(examples)  # every pair that fits is there, once
