"""MLflow records of a study, in the layout of docs/mlflow-layout.md.

One experiment per study; one parent run (``nlstm.kind = study``); in the evaluate and ablation
phases one config run per configuration (``nlstm.kind = config``); one trial run per training
run (``nlstm.kind = trial``). Every run is found again by its tags, never created twice: the
trial runs by ``nlstm.trial_id``, the config runs by phase and ``nlstm.config_hash``, the parent
by ``nlstm.kind = study``. That is what lets a resumed study re-attach to its runs.

``StudyTracker`` is the driver's side; ``TrialRun`` is what a trial (a Ray worker) writes;
``TrackingCallback`` records, from the driver, what a worker cannot: trials that the scheduler
stopped early (pruned) and trials whose worker died.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from ray import tune

from study.spec import StudySpec

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("train_bpc", "valid_bpc", "lr", "tokens_per_s", "train_time_s", "wall_time_s", "tokens_seen")
PACKAGES = ("nlstm", "torch", "numpy", "ray", "optuna", "mlflow", "pandas", "pydantic", "PyYAML")
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)


def find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list[Run]:
    """Live runs of the experiment whose ``nlstm.<key>`` tags have these values (newest first)."""
    filters = " and ".join(f"tags.`nlstm.{k}` = '{_quote(str(v))}'" for k, v in tags.items())
    return list(client.search_runs([experiment_id], filter_string=filters, order_by=["attributes.start_time DESC"]))


class StudyConflict(RuntimeError):
    """The study's name is already used by a study run from a different file."""


# ------------------------------------------------------------------ the driver
class StudyTracker:
    def __init__(self, tracking_uri: str, spec: StudySpec, spec_file: Path, study_dir: Path) -> None:
        self.tracking_uri, self.spec, self.spec_file, self.study_dir = tracking_uri, spec, spec_file, study_dir
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = ""
        self.parent_run_id = ""
        self.resumed = False

    def open(self, restart: bool = False, environment: dict[str, Any] | None = None,
             data_params: dict[str, Any] | None = None) -> str:
        """Find or create the experiment and the parent run; returns the parent run's id."""
        name = self.spec.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:"):  # next to the database, absolute for every worker
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=artifacts,
                                                               tags={"nlstm.study": name})
        else:
            self.experiment_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(self.experiment_id)
        parents = find_runs(self.client, self.experiment_id, kind="study")
        study_hash = self.spec.study_hash()
        if parents and restart:
            for run in self.client.search_runs([self.experiment_id], max_results=50_000):
                self.client.delete_run(run.info.run_id)
            parents = []
        if parents:
            parent = parents[0]
            old = parent.data.tags.get("nlstm.study_hash")
            if old != study_hash:
                raise StudyConflict(
                    f"study {name!r} in {self.tracking_uri} was run from a different study file "
                    f"(hash {str(old)[:12]} != {study_hash[:12]}); rerun with --restart to start it over, "
                    "or give the study another name"
                )
            self.parent_run_id, self.resumed = parent.info.run_id, True
            self.client.update_run(self.parent_run_id, status="RUNNING")
            return self.parent_run_id
        tags = {"nlstm.kind": "study", "nlstm.study": name, "nlstm.study_hash": study_hash,
                "mlflow.runName": name}
        if environment and environment.get("git_commit"):
            tags["mlflow.source.git.commit"] = environment["git_commit"]
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=_params(data_params or {}))
        staging = self.study_dir / "parent"
        staging.mkdir(parents=True, exist_ok=True)
        if self.spec_file.is_file():
            shutil.copyfile(self.spec_file, staging / "study.yaml")
        (staging / "spec.json").write_text(self.spec.to_json())
        (staging / "environment.json").write_text(json.dumps(environment or {}, indent=2, default=str))
        for f in ("study.yaml", "spec.json", "environment.json"):
            if (staging / f).is_file():
                self.client.log_artifact(self.parent_run_id, str(staging / f))
        return self.parent_run_id

    # -- phases
    def phase_done(self, phase: str) -> bool:
        return self.client.get_run(self.parent_run_id).data.tags.get(f"nlstm.phase.{phase}") == "done"

    def mark_phase_done(self, phase: str) -> None:
        self.client.set_tag(self.parent_run_id, f"nlstm.phase.{phase}", "done")

    def close(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- config runs (evaluate, ablation)
    def config_run(self, phase: str, config: Any, params: dict[str, Any], factors: dict[str, Any] | None = None,
                   extra_tags: dict[str, str] | None = None) -> str:
        existing = find_runs(self.client, self.experiment_id, kind="config", phase=phase,
                             config_hash=config.config_hash)
        if existing:
            return existing[0].info.run_id
        tags = {"mlflow.parentRunId": self.parent_run_id, "nlstm.kind": "config", "nlstm.phase": phase,
                "nlstm.study": self.spec.name, "nlstm.config_hash": config.config_hash, "nlstm.arch": config.arch,
                "nlstm.depth": str(config.depth), "nlstm.family": config.family, **(extra_tags or {})}
        tags |= {f"nlstm.factor.{k}": str(v) for k, v in (factors or {}).items()}
        name = f"{phase}-{config.family}-{config.config_hash[:6]}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def finish_config_runs(self, phase: str) -> None:
        for run in find_runs(self.client, self.experiment_id, kind="config", phase=phase):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="FINISHED")

    # -- trial runs
    def trial_run(self, key: str) -> Run | None:
        runs = find_runs(self.client, self.experiment_id, kind="trial", trial_id=key)
        return runs[0] if runs else None

    def count_runs(self, kind: str, phase: str | None = None) -> int:
        tags = {"kind": kind} | ({"phase": phase} if phase else {})
        return len(find_runs(self.client, self.experiment_id, **tags))


# ------------------------------------------------------------------ a trial (in a Ray worker)
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
        return self.tags.get("nlstm.status", "running")

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, key: str, tags: dict[str, str],
               params: dict[str, Any]) -> TrialRun:
        client = MlflowClient(tracking_uri)
        runs = find_runs(client, experiment_id, kind="trial", trial_id=key)
        wanted = {p.key: p.value for p in _params(params)}
        if runs:
            run = runs[0]
            if all(run.data.params.get(k) == v for k, v in wanted.items()):
                if run.info.status != "RUNNING" and run.data.tags.get("nlstm.status", "running") == "running":
                    client.update_run(run.info.run_id, status="RUNNING")
                return cls(client, run)
            # The resumed study re-sampled this trial differently (its first start was never
            # recorded by Tune): keep the old run, out of the way, and start a new one.
            client.log_batch(run.info.run_id, tags=[
                RunTag("nlstm.trial_id", f"{key}-superseded-{run.info.run_id[:8]}"),
                RunTag("nlstm.status", "failed"),
                RunTag("nlstm.fail_reason", "superseded: the resumed study sampled this trial again differently")])
            client.set_terminated(run.info.run_id, status="FAILED")
        run = client.create_run(experiment_id, run_name=key, tags=tags | {"nlstm.trial_id": key,
                                                                          "nlstm.status": "running"})
        client.log_batch(run.info.run_id, params=_params(params))
        return cls(client, client.get_run(run.info.run_id))

    def log_epoch(self, result: Any) -> None:
        """One epoch's metrics at ``step = epoch``; epochs logged before a restart are skipped."""
        if result.epoch <= self.logged_epochs:
            return
        ts = _now_ms()
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, float(getattr(result, k)), ts, result.epoch) for k in EPOCH_METRICS])
        self.logged_epochs = result.epoch

    def log_metrics(self, values: dict[str, float]) -> None:
        ts = _now_ms()
        metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: str | Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def final_metrics(self) -> dict[str, float]:
        return dict(self.client.get_run(self.run_id).data.metrics)

    def set_status(self, status: str, reason: str | None = None) -> None:
        tags = [RunTag("nlstm.status", status)]
        if reason:
            tags.append(RunTag("nlstm.fail_reason", reason[:1000]))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])
        self.tags["nlstm.status"] = status


# ------------------------------------------------------------------ driver-side Tune callback
class TrackingCallback(tune.Callback):
    """Marks the runs of trials that ended without saying so themselves: stopped early by the
    scheduler (``pruned``, with their last metrics as final ones) or dead workers (``failed``).

    Picklable (Tune stores its callbacks with the experiment); the client is made on first use.
    """

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "_client": None}

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
        if run is None or run.data.tags.get("nlstm.status") not in (None, "running"):
            return
        final = {"best_valid_bpc": result.get("best_valid_bpc"), "epochs_run": result.get("epoch"),
                 "num_params": result.get("num_params")}
        ts = _now_ms()
        self.client.log_batch(run.info.run_id, metrics=[
            Metric(k, float(v), ts, 0) for k, v in final.items() if isinstance(v, (int, float)) and math.isfinite(v)],
            tags=[RunTag("nlstm.status", "pruned")])
        self.client.set_terminated(run.info.run_id, status="KILLED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        if run is None or run.data.tags.get("nlstm.status") == "failed":
            return
        reason = error_summary(trial)
        self.client.log_batch(run.info.run_id, tags=[RunTag("nlstm.status", "failed"),
                                                     RunTag("nlstm.fail_reason", reason[:1000])])
        self.client.set_terminated(run.info.run_id, status="FAILED")


def trial_key_of(config: dict[str, Any]) -> str | None:
    """A trial's stable identity from its Tune config (see study.trial)."""
    if "trial_key" in config:
        return config["trial_key"]
    if "trial_number" in config:
        return f"search-{int(config['trial_number']):04d}"
    return None


def error_summary(trial: Any) -> str:
    """The last line of a failed trial's error (the exception), not the whole traceback."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    try:
        if path and os.path.exists(path):
            text = Path(path).read_text(errors="replace")
    except OSError:
        pass
    text = text or str(getattr(trial, "error_msg", "") or "unknown error")
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return re.sub(r"^[\w.]+\.(\w+: )", r"\1", line) or "unknown error"  # nlstm.trainer.DivergenceError -> ...


# ------------------------------------------------------------------ environment.json
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_info(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "python": sys.version.split()[0],
        "packages": versions,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "hostname": platform.node(),
                    "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
        "threads": {"driver_torch_threads": torch.get_num_threads()},
        "command": sys.argv,
        **(extra or {}),
    }
