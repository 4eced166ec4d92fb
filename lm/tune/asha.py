"""The sweep's ASHA: Ray's ``ASHAScheduler``, except that a trial's report at ``max_t`` (``train.max_steps``,
its last evaluation) is never answered with STOP.

Ray's bracket keeps a rung at ``max_t`` when ``max_t / grace_period`` is a power of the reduction factor
(``stop_last_trials=False`` only drops its separate check of ``max_t``), so a trial that reached its last step
but scored below that rung's cutoff was stopped there, that is killed while it published its model directory,
and listed as finished. A trial resumed from its checkpoint past the earlier rungs reports there first.
Imported only when a sweep starts (it imports Ray Tune); a module of its own so that Tune's saved experiment
(``tuner.pkl``) names the class and ``--resume`` finds it.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishingASHA(ASHAScheduler):
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE  # its last report: the trial ends by itself
        return super().on_trial_result(tune_controller, trial, result)
