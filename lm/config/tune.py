"""The ``tune`` section: a search space over any config field, the search algorithm and the scheduler.

    tune:
      search: grid                      # grid | random | optuna
      space:
        train.lr: {loguniform: [1.0e-4, 1.0e-2]}
        train.batch_size: {grid: [16, 32, 64]}
        model.dropout: {choice: [0.0, 0.1]}

Each dimension is exactly one of ``grid``, ``choice`` (lists of values), ``uniform``, ``loguniform``
(``[low, high]`` floats) or ``randint`` (``[low, high)`` integers). Keys are dotted config keys; every
candidate is checked against the schema when the config loads (lm.config.load.with_overrides).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lm.config.base import Section

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class Dimension(Section):
    """One searched config field: exactly one of the kinds below."""

    grid: list[Any] | None = Field(None, min_length=1, description="Every value is tried (a grid search).")
    choice: list[Any] | None = Field(None, min_length=1, description="One value sampled per trial.")
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: sampled uniformly.")
    loguniform: tuple[float, float] | None = Field(None, description="[low, high], low > 0: sampled log-uniformly.")
    randint: tuple[int, int] | None = Field(None, description="[low, high): an integer sampled uniformly.")

    @model_validator(mode="after")
    def _one_kind(self) -> Dimension:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        low_high = self.uniform or self.loguniform or self.randint
        if low_high is not None and not low_high[0] < low_high[1]:
            raise ValueError(f"{self.kind}: low must be below high, got {list(low_high)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    def candidates(self) -> list[Any]:
        """Values to check against the schema: every listed value, or a range's ends."""
        if self.kind in ("grid", "choice"):
            return list(self.value)
        low, high = self.value
        return [low, high - 1] if self.kind == "randint" else [low, high]


class TuneConfig(Section):
    """Hyperparameter search with Ray Tune over the real training (lm.tune)."""

    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every combination of grid dimensions; random: Ray's variant generator "
        "(grid dimensions crossed, the others sampled); optuna: Bayesian (TPE) through ray.tune.search.optuna "
        "(no grid dimensions).",
    )
    space: dict[str, Dimension] = Field(default_factory=dict, description="Dotted config key → dimension.")
    num_samples: int = Field(
        1, ge=1, description="grid/random: how many times the grid is repeated (each time sampling the "
        "other dimensions); optuna: the number of trials.",
    )
    metric: str = Field("val_bpb", description="The reported metric to optimise (val_bpb, val_loss, loss).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise the metric.")
    scheduler: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop poor trials early at rungs of grace_period x reduction_factor^k steps; "
        "fifo: run every trial to the end.",
    )
    grace_period: int | None = Field(
        None, ge=1, description="Steps a trial runs before ASHA may stop it; null = train.eval_interval."
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: keep the best 1/reduction_factor at each rung.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; null = as many as the cluster's CPUs/GPUs fit (each trial "
        "needs train.workers x its per-worker resources).",
    )
    seed: int | None = Field(0, description="Seed of the search algorithm (random/optuna sampling).")

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if self.search == "grid" and (sampled := [k for k, d in self.space.items() if d.kind != "grid"]):
            raise ValueError(f"search grid takes grid dimensions only ({', '.join(sampled)} are sampled): "
                             "use search random to mix grids and samples")
        grids = [k for k, d in self.space.items() if d.kind == "grid"]
        if self.search == "optuna" and grids:
            raise ValueError(f"search optuna cannot take grid dimensions ({', '.join(grids)}): use choice")
        return self
