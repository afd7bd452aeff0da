"""The driver's MLflow records of a study, in the layout of docs/mlflow-layout.md (names in
``study.layout``).

One experiment per study; one parent run (``nlstm.kind = study``); in the evaluate and ablation
phases one config run per configuration (``nlstm.kind = config``); one trial run per training
run (``nlstm.kind = trial``). Every run is found again by its tags, never created twice: the
trial runs by ``nlstm.trial_id``, the config runs by phase and ``nlstm.config_hash``, the parent
by ``nlstm.kind = study``. That is what lets a resumed study re-attach to its runs.

``StudyTracker`` is the driver's side (the experiment, the parent and config runs, environment.json);
a trial writes its own run with ``study.trial_run.TrialRun``, and ``study.tracking_callback``
records from the driver what a worker cannot.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException

from study.layout import (
    ARCH_TAG,
    CONFIG_HASH_TAG,
    DEPTH_TAG,
    EXPERIMENT_KIND_TAG,
    FAMILY_TAG,
    GIT_COMMIT_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    PHASE_TAG,
    RUN_NAME_TAG,
    STATUS_TAG,
    STUDY_HASH_TAG,
    STUDY_TAG,
    TAG,
    TRAINING_EXPERIMENT,
    factor_tag,
    phase_tag,
)
from study.lease import StudyLease
from study.schema import StudySpec
from study.store import open_client

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nlstm", "torch", "numpy", "ray", "optuna", "mlflow", "pandas", "pydantic", "PyYAML")


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


def as_params(values: dict[str, Any]) -> list[Param]:
    """MLflow params of ``values`` (as strings, cut to MLflow's limit)."""
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


def now_ms() -> int:
    return int(time.time() * 1000)


def find_runs(client: MlflowClient, experiment_id: str, **tags: str) -> list[Run]:
    """Live runs of the experiment whose ``nlstm.<key>`` tags have these values (newest first)."""
    filters = " and ".join(f"tags.`{TAG}{k}` = '{_quote(str(v))}'" for k, v in tags.items())
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
                    STUDY_TAG: name, EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT})
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
            old = parent.data.tags.get(STUDY_HASH_TAG)
            if old != study_hash:
                raise StudyConflict(
                    f"study {name!r} in {self.tracking_uri} was run from a different study file "
                    f"(hash {str(old)[:12]} != {study_hash[:12]}); rerun with --restart to start it over, "
                    "or give the study another name"
                )
            self.parent_run_id, self.resumed = parent.info.run_id, True
            self.client.update_run(self.parent_run_id, status="RUNNING")
            return self.parent_run_id
        tags = {KIND_TAG: "study", STUDY_TAG: name, STUDY_HASH_TAG: study_hash,
                RUN_NAME_TAG: name}
        if environment and environment.get("git_commit"):
            tags[GIT_COMMIT_TAG] = environment["git_commit"]
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=as_params(data_params or {}))
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
        return self.client.get_run(self.parent_run_id).data.tags.get(phase_tag(phase)) == "done"

    def mark_phase_done(self, phase: str) -> None:
        self.client.set_tag(self.parent_run_id, phase_tag(phase), "done")

    def mark_phase_failed(self, phase: str, summary: str) -> None:
        self.client.set_tag(self.parent_run_id, phase_tag(phase), f"failed: {summary}"[:5000])

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run; on an interruption also every run left RUNNING (re-opened on resume)."""
        try:
            if self.parent_run_id:
                if status == "KILLED":
                    for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                                       max_results=50_000):
                        if run.info.run_id == self.parent_run_id:
                            continue
                        if run.data.tags.get(KIND_TAG) == "trial":
                            self.client.set_tag(run.info.run_id, STATUS_TAG, "interrupted")
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
        tags = {PARENT_RUN_TAG: self.parent_run_id, KIND_TAG: "config", PHASE_TAG: phase,
                STUDY_TAG: self.spec.name, CONFIG_HASH_TAG: config.config_hash, ARCH_TAG: config.arch,
                DEPTH_TAG: str(config.depth), FAMILY_TAG: config.family, **(extra_tags or {})}
        tags |= {factor_tag(k): str(v) for k, v in (factors or {}).items()}
        name = f"{phase}-{config.family}-{config.config_hash[:6]}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(run.info.run_id, params=as_params(params))
        return run.info.run_id

    def finish_config_runs(self, phase: str) -> None:
        for run in find_runs(self.client, self.experiment_id, kind="config", phase=phase):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status="FINISHED")

    # -- trial runs
    def trial_run(self, key: str) -> Run | None:
        runs = find_runs(self.client, self.experiment_id, kind="trial", trial_id=key)
        return runs[0] if runs else None


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
