"""The driver's Tune callback that records in MLflow what a trial's worker cannot: trials that a
scheduler stopped early (pruned), trials an interruption stopped, and trials whose worker died; and
the one-line error of a failed trial."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag
from ray import tune

from study.record.layout import (
    FAIL_REASON_TAG,
    FAMILY_TAG,
    KIND_TAG,
    MLFLOW_STATUS,
    PARENT_RUN_TAG,
    PHASE_TAG,
    SEED_TAG,
    STATUS_TAG,
    STOP_REASON_TAG,
    STUDY_TAG,
    TRIAL_ID_TAG,
    trial_key_of,
)
from study.record.tracker import find_runs, now_ms


class TrackingCallback(tune.Callback):
    """Marks the runs of trials that ended without saying so themselves: stopped early by their scheduler
    (``pruned``, with their last metrics as final ones), stopped by an interruption (``interrupted``:
    the next driver continues them) or dead workers (``failed``).

    ``stopped`` is the scheduler's set of trials it stopped (``study.search.scheduler``). Tune snapshots its
    callbacks with the experiment (never read back); the client is made on first use.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, study: str = "", stopped: set[str] | None = None,
                 fence: Any = None) -> None:
        self.tracking_uri, self.experiment_id, self.study = tracking_uri, experiment_id, study
        self.stopped = stopped if stopped is not None else set()
        self.fence = fence or (lambda: None)
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "study": self.study}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _run(self, trial: Any) -> Run | None:
        key = (trial.last_result or {}).get("trial_key") or trial_key_of(trial.config)
        runs = find_runs(self.client, self.experiment_id, kind="trial", trial_id=key) if key else []
        return runs[0] if runs else None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        if result.get("finished"):
            return
        run = self._run(trial)
        if run is None or run.data.tags.get(STATUS_TAG) not in (None, "running"):
            return
        self.fence()
        if trial.trial_id not in self.stopped:  # Tune stopped it on Ctrl+C or SIGTERM: the next driver continues it
            self.client.log_batch(run.info.run_id, tags=[RunTag(STATUS_TAG, "interrupted"),
                                                          RunTag(STOP_REASON_TAG, "interrupted")])
            self.client.set_terminated(run.info.run_id, status=MLFLOW_STATUS["interrupted"])
            return
        final = {"best_valid_bpc": result.get("best_valid_bpc"), "epochs_run": result.get("epoch"),
                 "num_params": result.get("num_params")}
        ts = now_ms()
        self.client.log_batch(run.info.run_id, metrics=[
            Metric(k, float(v), ts, 0) for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)],
            tags=[RunTag(STATUS_TAG, "pruned"), RunTag(STOP_REASON_TAG, "pruned")])
        self.client.set_terminated(run.info.run_id, status=MLFLOW_STATUS["pruned"])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        if run is not None and run.data.tags.get(STATUS_TAG) in ("failed", "interrupted"):
            return  # the trial recorded its own end (a full disk is an interruption, not its failure)
        self.fence()
        reason = error_summary(trial)
        tags = [RunTag(STATUS_TAG, "failed"), RunTag(FAIL_REASON_TAG, reason[:1000]), RunTag(STOP_REASON_TAG, "failed")]
        if run is None:  # it died before it could record itself (an import error on the worker, say)
            config = trial.config or {}
            key, parent = trial_key_of(config), config.get("parent_run_id")
            if key is None or parent is None:
                return
            run = self.client.create_run(self.experiment_id, run_name=key, tags={
                PARENT_RUN_TAG: parent, KIND_TAG: "trial", PHASE_TAG: config.get("phase", ""),
                FAMILY_TAG: config.get("family", ""), SEED_TAG: str(config.get("seed", "")),
                STUDY_TAG: self.study, TRIAL_ID_TAG: key})
        self.client.log_batch(run.info.run_id, tags=tags)
        self.client.set_terminated(run.info.run_id, status="FAILED")


def error_summary(trial: Any) -> str:
    """The last line of a failed trial's error (the exception), not the whole traceback."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text(errors="replace")
    except OSError:
        pass
    return error_line(text or str(getattr(trial, "error_msg", "") or ""))


def error_line(text: str) -> str:
    """The exception line of an error text or traceback, without its module path."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return re.sub(r"^[\w.]+\.(\w+: )", r"\1", line) or "unknown error"  # nlstm.trainer.DivergenceError -> ...
