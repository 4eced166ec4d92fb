"""Helpers of the tests that interrupt Ray Train runs and check what a resume restored (test_tune,
test_continual)."""

import contextlib
import io

import psutil


def ray_train_processes() -> list[psutil.Process]:
    """The Ray Train controllers and workers of this session's Ray (its processes are the test process's
    descendants)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(process.cmdline()).startswith(("ray::TrainController", "ray::RayTrainWorker")):
                found.append(process)
    return found


def optimizer_counts(store, checkpoint: str) -> tuple[set[int], int, int]:
    """What the DeepSpeed checkpoint (ZeRO 1/2, one rank) inside a Ray Train checkpoint says of the optimizer:
    Adam's step count per parameter group, the LR schedule's step and the engine's (DeepSpeed's own pickles,
    read as it reads them)."""
    import torch

    def load(name: str) -> dict:
        return torch.load(io.BytesIO(store.read_bytes(f"{checkpoint}/state/{name}")), weights_only=False)

    adam = load("zero_pp_rank_0_mp_rank_00_optim_states.pt")["optimizer_state_dict"]["base_optimizer_state"]
    model = load("mp_rank_00_model_states.pt")
    return {int(s["step"]) for s in adam["state"].values()}, model["lr_scheduler"]["last_epoch"], model["global_steps"]
