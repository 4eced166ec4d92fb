"""lm.train.resume without Ray or DeepSpeed: the trainer state's file, which way a checkpoint resumes on
another number of workers, where a checkpoint lives in storage, and each rank's RNG. (The resume itself,
with DeepSpeed's universal checkpoint: tests/integration/test_train_ray.py.)"""

import math

import pytest
import torch

from lm.config import StorageConfig, TrainConfig, join_uri
from lm.data.stream import StreamPosition
from lm.storage import ObjectStore
from lm.train.ds_config import deepspeed_config
from lm.train.resume import Resume, TrainerState, checkpoint_uri, restore_rng
from lm.train.rng import save_rng_state


def test_the_trainer_state_file_keeps_an_infinite_best_and_the_data_position(tmp_path):
    state = TrainerState(step=10, world_size=2, history=[{"step": 10, "loss": 3.5}], tokens_per_step=2048,
                         data=StreamPosition(rows=101, world=2, consumed=40, plan=[(3, 50), (60, 101)]))
    state.write(tmp_path)
    assert TrainerState.read(tmp_path) == state and math.isinf(TrainerState.read(tmp_path).best)
    older = '{"step": 5, "best": 4.0, "bad_evals": 1, "world_size": 2, "history": []}'  # before data, batch
    (tmp_path / "trainer_state.json").write_text(older)
    assert TrainerState.read(tmp_path).data is None and TrainerState.read(tmp_path).tokens_per_step is None


@pytest.mark.parametrize(("saved", "world", "stage", "mode"), [
    (2, 2, 3, "exact"), (2, 1, 1, "universal"), (2, 1, 2, "universal"), (2, 3, 3, "universal"), (2, 1, 0, "full"),
])
def test_the_way_a_checkpoint_resumes(tmp_path, saved, world, stage, mode):
    source = Resume(folder=tmp_path, uri=str(tmp_path), state=TrainerState(step=1, world_size=saved), world=world,
                    zero_stage=stage)
    assert source.mode == mode
    assert ("exactly" in source.describe()) == (mode == "exact")


def test_the_engine_reads_a_universal_checkpoint_only_when_asked():
    train = TrainConfig(zero_stage=1, workers=1)
    assert "checkpoint" not in deepspeed_config(train, seq_len=64, world=1, on_gpu=False)
    assert (deepspeed_config(train, seq_len=64, world=1, on_gpu=False, universal=True)["checkpoint"]
            == {"load_universal": True})


@pytest.mark.parametrize("root", ["local", "s3://bucket/pre"])
def test_a_checkpoint_uri_is_its_path_on_rays_filesystem_under_the_run(tmp_path, root):
    settings = {"endpoint_url": "http://127.0.0.1:9", "access_key_id": "k", "secret_access_key": "s"}
    store = ObjectStore(StorageConfig(root=str(tmp_path), **settings) if root == "local"
                        else StorageConfig(root=root, region="us-east-1", **settings))
    run = join_uri(str(tmp_path) if root == "local" else root, "runs", "x")
    base = store.pyarrow_filesystem(join_uri(run, "train"))[1]
    assert checkpoint_uri(store, run, f"{base}/ray/checkpoint_2026") == join_uri(run, "train", "ray", "checkpoint_2026")
    with pytest.raises(ValueError, match="not under"):
        checkpoint_uri(store, run, base.replace("/x/", "/y/") + "/ray/checkpoint_2026")


def test_a_rank_restores_its_saved_rng_and_a_rank_beyond_the_saved_ones_seeds_from_seed_rank_step(tmp_path):
    torch.manual_seed(5)
    save_rng_state(tmp_path / "rng-0.safetensors")
    expected = torch.rand(3)
    assert restore_rng(tmp_path, 0, seed=1, step=10) and torch.equal(torch.rand(3), expected)
    assert not restore_rng(tmp_path, 1, seed=1, step=10)  # no rng-1: a new rank
    drawn = torch.rand(3)
    restore_rng(tmp_path, 1, seed=1, step=10)
    assert torch.equal(torch.rand(3), drawn)  # the same seeds whenever rank 1 starts at step 10
    for rank, step in ((2, 10), (1, 0)):  # another rank, another step: other draws
        restore_rng(tmp_path, rank, seed=1, step=step)
        assert not torch.equal(torch.rand(3), drawn)
