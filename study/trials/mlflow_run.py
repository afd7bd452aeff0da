"""A trial's MLflow run, written from inside its Ray worker (the layout of docs/mlflow-layout.md):
created once, re-attached when the trial runs again, one metric batch per epoch, each epoch once.

Every write checks the study's lease first (``fence``): a trial of a driver that lost the study to
another driver writes nothing more (see ``study.record.lease``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag

from study.record.layout import (
    ATTEMPTS_TAG,
    CODE_VERSION_TAG,
    EPOCH_METRICS,
    FAIL_REASON_TAG,
    MLFLOW_STATUS,
    STATUS_TAG,
    STOP_REASON_TAG,
    TRIAL_ID_TAG,
)
from study.record.tracker import as_params, find_runs, now_ms

MAX_ATTEMPTS = 3  # a trial that failed for another reason than divergence is retried on resume this many times


VERSION_STEP = " -> "  # nlstm.code_version of a run resumed on newer code: every version that trained it, in order


def with_versions_so_far(tags: dict[str, str], recorded: dict[str, str]) -> dict[str, str]:
    """The code-version tag of a run trained again by this code: the versions that trained it before, then this
    one (``0.2.0+g1a2b3c4 -> 0.2.0+g5d6e7f8``), so a run resumed on newer code never claims one version."""
    new, before = tags.get(CODE_VERSION_TAG), recorded.get(CODE_VERSION_TAG)
    if not new or not before:
        return {}
    versions = before.split(VERSION_STEP)
    return {CODE_VERSION_TAG: before if versions[-1] == new else VERSION_STEP.join([*versions, new])}


class TrialRun:
    """A trial's MLflow run, created once and re-attached when the trial runs again."""

    def __init__(self, client: MlflowClient, run: Run, fence: Callable[[], None] | None = None) -> None:
        self.client, self.run_id = client, run.info.run_id
        self.fence = fence or (lambda: None)
        self.tags = dict(run.data.tags)
        self.logged_epochs = 0
        if run.data.metrics.get("valid_bpc") is not None:
            history = client.get_metric_history(self.run_id, "valid_bpc")
            self.logged_epochs = max((m.step for m in history), default=0)

    @property
    def status(self) -> str:
        return self.tags.get(STATUS_TAG, "running")

    @property
    def attempts(self) -> int:
        return int(self.tags.get(ATTEMPTS_TAG, "1"))

    def retry(self) -> None:
        """Run a trial again that failed for a reason other than divergence (a locked store, a lost
        worker, out of memory), counting the attempts."""
        self.fence()
        attempts = str(self.attempts + 1)
        self.client.log_batch(self.run_id, tags=[RunTag(STATUS_TAG, "running"), RunTag(ATTEMPTS_TAG, attempts)])
        self.client.update_run(self.run_id, status="RUNNING")
        self.tags |= {STATUS_TAG: "running", ATTEMPTS_TAG: attempts}

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, key: str, tags: dict[str, str],
               params: dict[str, Any], fence: Callable[[], None] | None = None) -> TrialRun:
        client = MlflowClient(tracking_uri)
        (fence or (lambda: None))()
        runs = find_runs(client, experiment_id, kind="trial", trial_id=key)
        wanted = {p.key: p.value for p in as_params(params)}
        if runs:
            run = runs[0]
            if not run.data.params:  # a placeholder the driver recorded for a trial that died before starting
                client.log_batch(run.info.run_id, params=as_params(params),
                                 tags=[RunTag(k, v) for k, v in tags.items()])
                return cls(client, client.get_run(run.info.run_id), fence)
            if all(run.data.params.get(k) == v for k, v in wanted.items()):
                if run.data.tags.get(STATUS_TAG, "running") in ("running", "interrupted"):
                    tags = tags | with_versions_so_far(tags, run.data.tags)
                    client.log_batch(run.info.run_id, tags=[RunTag(STATUS_TAG, "running")]
                                     + [RunTag(k, v) for k, v in tags.items()])
                    client.update_run(run.info.run_id, status="RUNNING")
                    run = client.get_run(run.info.run_id)
                return cls(client, run, fence)
            differing = sorted(k for k, v in wanted.items() if run.data.params.get(k) != v)
            raise RuntimeError(f"trial {key}: its run {run.info.run_id} in the store was recorded with other "
                               f"settings ({', '.join(differing[:5])}); the record is not this study's")
        run = client.create_run(experiment_id, run_name=key, tags=tags | {TRIAL_ID_TAG: key, STATUS_TAG: "running"})
        client.log_batch(run.info.run_id, params=as_params(params))
        return cls(client, client.get_run(run.info.run_id), fence)

    def supersede(self, reason: str) -> TrialRun:
        """Set this run aside (its trial id renamed, FAILED with ``reason``) and return a fresh run of the same
        trial: for a trial that must start over, so that no run holds epochs of two trainings."""
        self.fence()
        key = self.tags[TRIAL_ID_TAG]
        self.client.log_batch(self.run_id, tags=[
            RunTag(TRIAL_ID_TAG, f"{key}-superseded-{self.run_id[:8]}"), RunTag(STATUS_TAG, "failed"),
            RunTag(FAIL_REASON_TAG, f"superseded: {reason}"[:1000])])
        self.client.set_terminated(self.run_id, status="FAILED")
        old = self.client.get_run(self.run_id)
        tags = {k: v for k, v in old.data.tags.items() if k.startswith("nlstm.") or k == "mlflow.parentRunId"}
        tags |= {TRIAL_ID_TAG: key, STATUS_TAG: "running"}
        for k in (FAIL_REASON_TAG, STOP_REASON_TAG, ATTEMPTS_TAG):
            tags.pop(k, None)
        run = self.client.create_run(old.info.experiment_id, run_name=key, tags=tags)
        self.client.log_batch(run.info.run_id, params=as_params(old.data.params))
        return TrialRun(self.client, self.client.get_run(run.info.run_id), self.fence)

    def log_epoch(self, result: Any, extra: dict[str, float] | None = None) -> None:
        """One epoch's metrics at ``step = epoch``; epochs logged before a restart are skipped."""
        if result.epoch <= self.logged_epochs:
            return
        self.fence()
        ts = now_ms()
        values = {k: getattr(result, k, None) for k in EPOCH_METRICS} | dict(extra or {})
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(v), ts, result.epoch) for k, v in values.items() if v is not None and v == v])
        self.logged_epochs = result.epoch

    def log_metrics(self, values: dict[str, float]) -> None:
        self.fence()
        ts = now_ms()
        metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | Path) -> None:
        self.fence()
        self.client.log_artifact(self.run_id, str(path))

    def final_metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Where this attempt runs (node, host, device, threads): the latest attempt's."""
        self.fence()
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags |= tags

    def set_status(self, status: str, reason: str | None = None, stop_reason: str | None = None) -> None:
        self.fence()
        tags = [RunTag(STATUS_TAG, status)]
        if stop_reason:
            tags.append(RunTag(STOP_REASON_TAG, stop_reason))
        if reason:
            tags.append(RunTag(FAIL_REASON_TAG, reason[:1000]))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])
        self.tags[STATUS_TAG] = status
