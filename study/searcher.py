"""OptunaSearch that tells Optuna the truth about trials a Tune scheduler stopped early.

Ray's ``OptunaSearch`` tells every trial that ended without an error to Optuna as COMPLETE with
its last value. A trial that ASHA (or the median rule) stopped after 1 of 8 epochs then counts as
a finished trial with a poor score, and TPE learns that its region is bad. Here a trial counts as
COMPLETE only if its last result says ``finished`` (the trainable sets it on its real last
epoch); otherwise its last value is reported as an intermediate value and it is told PRUNED,
which is how Optuna's own pruners record it. Errors stay FAIL.

Ray also skips ``on_trial_result`` for the result on which a scheduler decides to stop, so that
value is added here before the trial is told.

The Optuna study lives in a storage (``study.optuna_store``), so it outlives a killed driver,
whereas the searcher is restored from Tune's last snapshot: an Optuna trial asked for after that
snapshot is known to the storage but to no Tune trial. On restore such orphans are told FAIL and
marked (``ORPHAN_ATTR``), so that the search asks for their place again (``study.space.search_turn``).
The other way round, a trial that the killed driver had already told Optuna is finished is replayed by
the restored Tune (its finished run reports again): the storage's ending stands and the replay is
ignored, instead of Optuna's ``UpdateFinishedTrialError`` stopping the study.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from study.space import ORPHAN_ATTR

FINISHED = "finished"
log = logging.getLogger(__name__)


class PruneAwareOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_step: dict[str, int] = {}  # last step reported to each Optuna trial
        self._storage_checked: set[str] = set()  # trials whose state in the storage was read (_ended_in_storage)

    def _ended_in_storage(self, trial_id: str) -> bool:
        """True (and the trial counted as completed) when the storage already holds its end. Read once
        per trial: only a replay after a restore can find one ended, and the study's lease keeps any
        other driver from ending trials meanwhile."""
        if trial_id in self._storage_checked:
            return False
        self._storage_checked.add(trial_id)
        number = self._ot_trials[trial_id].number
        if self._ot_study.get_trials(deepcopy=False)[number].state.is_finished():
            self._completed_trials.add(trial_id)
            return True
        return False

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if trial_id in self._completed_trials or self._ended_in_storage(trial_id):
            return  # told before a driver was killed, replayed by the restored Tune
        super().on_trial_result(trial_id, result)
        if TRAINING_ITERATION in result:
            self._last_step[trial_id] = result[TRAINING_ITERATION]

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials and self._ended_in_storage(trial_id):
            return
        if error or not result or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        ot_trial = self._ot_trials[trial_id]
        value, step = result.get(self.metric), result.get(TRAINING_ITERATION)
        if value is not None and step is not None and self._last_step.get(trial_id) != step:
            ot_trial.report(value, step)  # the result the scheduler stopped it on: never passed on by Ray
            self._last_step[trial_id] = step
        if result.get(FINISHED):
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        try:
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
        except Exception as exc:  # as OptunaSearch does: a bad value must not stop the study
            log.warning("could not tell Optuna that trial %s was pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._storage_checked = set()  # the snapshot's reads are older than the storage: read again
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:  # asked for by a killed driver after Tune's last snapshot
                optuna.trial.Trial(self._ot_study, t._trial_id).set_user_attr(ORPHAN_ATTR, True)
                self._ot_study.tell(t.number, state=TrialState.FAIL)
