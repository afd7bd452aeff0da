"""One Tune scheduler for every phase of a study: the search's scheduler per family, FIFO for the rest.

A study runs all its phases in one Tuner (one set of trial processes), so the scheduler sees search,
evaluate and ablation trials alike. Only search trials may be stopped early, and only against trials
of their own search family (``search.families``): each family gets its own instance of the study's
scheduler (ASHA or the median rule), so a family that learns more slowly at first is not cut by
another family's rungs, and every family's tuning budget is spent the same way. A search without
families has one scheduler over all its trials, as it has one sampler. Rungs count the trial's own ``epoch`` (not
Tune's iterations, which restart when a trial continues from its checkpoint in a later driver).

``stopped`` holds the trials a scheduler decided to stop: the searcher tells Optuna those are
PRUNED and the progress line calls them pruned; a trial that ended unfinished without that
decision was interrupted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class FamilyScheduler(FIFOScheduler):
    def __init__(self, make_inner: Callable[[], TrialScheduler] | None) -> None:
        super().__init__()
        self.make_inner = make_inner  # None: no early stopping in the search
        self.inner: dict[str, TrialScheduler] = {}
        self.stopped: set[str] = set()  # Tune trial ids a scheduler stopped
        self._properties: tuple[str | None, str | None] = (None, None)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._properties = (metric, mode)
        return super().set_search_properties(metric, mode, **spec)

    def _scheduler_of(self, trial: Any) -> TrialScheduler | None:
        config = trial.config or {}
        if self.make_inner is None or config.get("phase") != "search":
            return None
        family = config.get("tuning_group", "")  # the search family ("" for a search without families)
        if family not in self.inner:
            scheduler = self.make_inner()
            scheduler.set_search_properties(*self._properties)
            self.inner[family] = scheduler
        return self.inner[family]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        scheduler = self._scheduler_of(trial)
        if scheduler is not None:
            scheduler.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        scheduler = self._scheduler_of(trial)
        if scheduler is None or result.get("finished"):
            return TrialScheduler.CONTINUE
        decision = scheduler.on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            self.stopped.add(trial.trial_id)
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        scheduler = self._scheduler_of(trial)
        if scheduler is not None:
            scheduler.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        scheduler = self._scheduler_of(trial)
        if scheduler is not None:
            scheduler.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        scheduler = self._scheduler_of(trial)
        if scheduler is not None:
            scheduler.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{family or 'search'}: {s.debug_string()}" for family, s in self.inner.items()) or "FIFO"

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its scheduler with the experiment; this one is never restored from it."""
        return {}

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a new driver starts its schedulers afresh (trials that a scheduler stopped are
        told PRUNED in the record and never run again)."""

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a study's scheduler is built again from its record, never restored")
