"""A trial's MLflow run, written from inside its Ray worker (the layout of docs/mlflow-layout.md):
created once, re-attached when the trial runs again, one metric batch per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag

from study.layout import (
    ATTEMPTS_TAG,
    EPOCH_METRICS,
    FAIL_REASON_TAG,
    MLFLOW_STATUS,
    STATUS_TAG,
    TRIAL_ID_TAG,
    trial_run_name,
)
from study.tracking import as_params, find_runs, now_ms

MAX_ATTEMPTS = 3  # a trial that failed for another reason than divergence is retried on resume this many times


class TrialRun:
    """A trial's MLflow run, created once and re-attached when the trial runs again."""

    def __init__(self, client: MlflowClient, run: Run) -> None:
        self.client, self.run_id = client, run.info.run_id
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
        attempts = str(self.attempts + 1)
        self.client.log_batch(self.run_id, tags=[RunTag(STATUS_TAG, "running"), RunTag(ATTEMPTS_TAG, attempts)])
        self.client.update_run(self.run_id, status="RUNNING")
        self.tags |= {STATUS_TAG: "running", ATTEMPTS_TAG: attempts}

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, key: str, tags: dict[str, str],
               params: dict[str, Any]) -> TrialRun:
        client = MlflowClient(tracking_uri)
        runs = find_runs(client, experiment_id, kind="trial", trial_id=key)
        wanted = {p.key: p.value for p in as_params(params)}
        if runs:
            run = runs[0]
            if not run.data.params:  # a placeholder the driver recorded for a trial that died before starting
                client.log_batch(run.info.run_id, params=as_params(params),
                                 tags=[RunTag(k, v) for k, v in tags.items()])
                return cls(client, client.get_run(run.info.run_id))
            if all(run.data.params.get(k) == v for k, v in wanted.items()):
                if run.data.tags.get(STATUS_TAG, "running") in ("running", "interrupted"):
                    client.log_batch(run.info.run_id, tags=[RunTag(STATUS_TAG, "running")])
                    client.update_run(run.info.run_id, status="RUNNING")
                    run = client.get_run(run.info.run_id)
                return cls(client, run)
            # The resumed study re-sampled this trial differently (its first start was never
            # recorded by Tune): keep the old run, out of the way, and start a new one.
            client.log_batch(run.info.run_id, tags=[
                RunTag(TRIAL_ID_TAG, f"{key}-superseded-{run.info.run_id[:8]}"),
                RunTag(STATUS_TAG, "failed"),
                RunTag(FAIL_REASON_TAG, "superseded: the resumed study sampled this trial again differently")])
            client.set_terminated(run.info.run_id, status="FAILED")
        run = client.create_run(experiment_id, run_name=trial_run_name(key, tags),
                                tags=tags | {TRIAL_ID_TAG: key, STATUS_TAG: "running"})
        client.log_batch(run.info.run_id, params=as_params(params))
        return cls(client, client.get_run(run.info.run_id))

    def log_epoch(self, result: Any) -> None:
        """One epoch's metrics at ``step = epoch``; epochs logged before a restart are skipped."""
        if result.epoch <= self.logged_epochs:
            return
        ts = now_ms()
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(getattr(result, k)), ts, result.epoch) for k in EPOCH_METRICS])
        self.logged_epochs = result.epoch

    def log_metrics(self, values: dict[str, float]) -> None:
        ts = now_ms()
        metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def final_metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Where this attempt runs (node, host, device, threads): the latest attempt's."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags |= tags

    def set_status(self, status: str, reason: str | None = None) -> None:
        tags = [RunTag(STATUS_TAG, status)]
        if reason:
            tags.append(RunTag(FAIL_REASON_TAG, reason[:1000]))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])
        self.tags[STATUS_TAG] = status
