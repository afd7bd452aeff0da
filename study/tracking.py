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
from mlflow.exceptions import MlflowException
from ray import tune

from study.lease import StudyLease
from study.schema import StudySpec
from study.store import open_client

REPO_ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("train_bpc", "valid_bpc", "lr", "tokens_per_s", "train_time_s", "wall_time_s", "tokens_seen")
PACKAGES = ("nlstm", "torch", "numpy", "ray", "optuna", "mlflow", "pandas", "pydantic", "PyYAML")
# A pruned trial ended as its scheduler meant it to: FINISHED, so MLflow's UI does not show it as a failure.
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# MLflow 3's UI opens an experiment on its GenAI overview unless it is marked as model training.
EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT = "mlflow.experimentKind", "custom_model_development"
MAX_ATTEMPTS = 3  # a trial that failed for another reason than divergence is retried on resume this many times


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
        self.client = open_client(tracking_uri)  # a fresh sqlite store is created whole, by one driver
        self.experiment_id = ""
        self.parent_run_id = ""
        self.resumed = False
        self.lease: StudyLease | None = None

    def _experiment(self) -> str:
        """The study's experiment, created once even when two drivers ask at the same moment."""
        name = self.spec.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            artifacts = None
            if self.tracking_uri.startswith("sqlite:"):  # next to the database, absolute for every worker
                artifacts = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=artifacts, tags={
                    "nlstm.study": name, EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
            except MlflowException:
                exp = self.client.get_experiment_by_name(name)  # the other driver created it first
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def acquire_lease(self, on_lost: Any = None) -> str | None:
        """Hold the study's lease in the store (``study.lease``); returns a note if a stale one was taken over."""
        self.experiment_id = self._experiment()
        self.lease = StudyLease(self.client, self.experiment_id, self.spec.name, on_lost=on_lost)
        return self.lease.acquire()

    def open(self, restart: bool = False, environment: dict[str, Any] | None = None,
             data_params: dict[str, Any] | None = None) -> str:
        """Find or create the parent run (under the lease); returns the parent run's id."""
        name = self.spec.name
        if self.lease is None:
            self.acquire_lease()
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

    def mark_phase_failed(self, phase: str, summary: str) -> None:
        self.client.set_tag(self.parent_run_id, f"nlstm.phase.{phase}", f"failed: {summary}"[:5000])

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run; on an interruption also every run left RUNNING (re-opened on resume)."""
        try:
            if self.parent_run_id:
                if status == "KILLED":
                    for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                                       max_results=50_000):
                        if run.info.run_id == self.parent_run_id:
                            continue
                        if run.data.tags.get("nlstm.kind") == "trial":
                            self.client.set_tag(run.info.run_id, "nlstm.status", "interrupted")
                        self.client.set_terminated(run.info.run_id, status="KILLED")
                self.client.set_terminated(self.parent_run_id, status=status)
        finally:
            if self.lease is not None:
                self.lease.release()

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

    @property
    def attempts(self) -> int:
        return int(self.tags.get("nlstm.attempts", "1"))

    def retry(self) -> None:
        """Run a trial again that failed for a reason other than divergence (a locked store, a lost
        worker, out of memory), counting the attempts."""
        attempts = str(self.attempts + 1)
        self.client.log_batch(self.run_id, tags=[RunTag("nlstm.status", "running"), RunTag("nlstm.attempts", attempts)])
        self.client.update_run(self.run_id, status="RUNNING")
        self.tags |= {"nlstm.status": "running", "nlstm.attempts": attempts}

    @classmethod
    def attach(cls, tracking_uri: str, experiment_id: str, key: str, tags: dict[str, str],
               params: dict[str, Any]) -> TrialRun:
        client = MlflowClient(tracking_uri)
        runs = find_runs(client, experiment_id, kind="trial", trial_id=key)
        wanted = {p.key: p.value for p in _params(params)}
        if runs:
            run = runs[0]
            if not run.data.params:  # a placeholder the driver recorded for a trial that died before starting
                client.log_batch(run.info.run_id, params=_params(params), tags=[RunTag(k, v) for k, v in tags.items()])
                return cls(client, client.get_run(run.info.run_id))
            if all(run.data.params.get(k) == v for k, v in wanted.items()):
                if run.data.tags.get("nlstm.status", "running") in ("running", "interrupted"):
                    client.log_batch(run.info.run_id, tags=[RunTag("nlstm.status", "running")])
                    client.update_run(run.info.run_id, status="RUNNING")
                    run = client.get_run(run.info.run_id)
                return cls(client, run)
            # The resumed study re-sampled this trial differently (its first start was never
            # recorded by Tune): keep the old run, out of the way, and start a new one.
            client.log_batch(run.info.run_id, tags=[
                RunTag("nlstm.trial_id", f"{key}-superseded-{run.info.run_id[:8]}"),
                RunTag("nlstm.status", "failed"),
                RunTag("nlstm.fail_reason", "superseded: the resumed study sampled this trial again differently")])
            client.set_terminated(run.info.run_id, status="FAILED")
        run = client.create_run(experiment_id, run_name=trial_run_name(key, tags),
                                tags=tags | {"nlstm.trial_id": key, "nlstm.status": "running"})
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

    def set_tags(self, tags: dict[str, str]) -> None:
        """Where this attempt runs (node, host, device, threads): the latest attempt's."""
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.tags |= tags

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

    def __init__(self, tracking_uri: str, experiment_id: str, study: str = "", phase: str = "",
                 parents: dict[str, str] | None = None) -> None:
        self.tracking_uri, self.experiment_id, self.study, self.phase = tracking_uri, experiment_id, study, phase
        self.parents = parents or {}  # trial key (or "*" for every trial) -> the MLflow run it belongs under
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_client"} | {"_client": None}

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
        self.client.set_terminated(run.info.run_id, status=MLFLOW_STATUS["pruned"])

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self._run(trial)
        if run is not None and run.data.tags.get("nlstm.status") == "failed":
            return
        reason = error_summary(trial)
        tags = [RunTag("nlstm.status", "failed"), RunTag("nlstm.fail_reason", reason[:1000])]
        if run is None:  # it died before it could record itself (an import error on the worker, say)
            key = trial_key_of(trial.config)
            parent = self.parents.get(key or "", self.parents.get("*"))
            if key is None or parent is None:
                return
            run = self.client.create_run(self.experiment_id, run_name=key, tags={
                "mlflow.parentRunId": parent, "nlstm.kind": "trial", "nlstm.phase": self.phase,
                "nlstm.study": self.study, "nlstm.trial_id": key})
        self.client.log_batch(run.info.run_id, tags=tags)
        self.client.set_terminated(run.info.run_id, status="FAILED")


def trial_run_name(key: str, tags: dict[str, str]) -> str:
    """A run name that says what the run is, in the UI's narrow column: ``search-0003-nlstm-d2``,
    ``evaluate-nlstm-d2-s1-3fa2c1`` (the config hash's start tells two configurations of one
    family apart). The run's identity is its ``nlstm.trial_id`` tag, never its name."""
    family = tags.get("nlstm.family")
    if not family:
        return key
    if key.startswith("search-"):
        return f"{key}-{family}"
    phase, seed, config = tags.get("nlstm.phase", ""), tags.get("nlstm.seed", ""), tags.get("nlstm.config_hash", "")
    return f"{phase}-{family}-s{seed}-{config[:6]}" if phase and seed else key


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
    return error_line(text or str(getattr(trial, "error_msg", "") or ""))


def error_line(text: str) -> str:
    """The exception line of an error text or traceback, without its module path."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), lines[-1] if lines else "")
    return re.sub(r"^[\w.]+\.(\w+: )", r"\1", line) or "unknown error"  # nlstm.trainer.DivergenceError -> ...


# ------------------------------------------------------------------ environment.json
def _git(*args: str) -> str | None:
    """Git facts of this checkout; None for an installed package (the repository that happens to
    enclose a virtual environment is not the code that ran)."""
    if not ((REPO_ROOT / ".git").exists() and (REPO_ROOT / "pyproject.toml").is_file()):
        return None
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
