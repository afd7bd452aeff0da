"""The driver's MLflow records of a study, in the layout of docs/mlflow-layout.md (names in
``study.record.layout``).

One experiment per study; one parent run (``nlstm.kind = study``); in the evaluate and ablation
phases one config run per configuration (``nlstm.kind = config``); one trial run per training
run (``nlstm.kind = trial``). Every run is found again by its tags, never created twice: the
trial runs by ``nlstm.trial_id``, the config runs by phase and ``nlstm.config_hash``, the parent
by ``nlstm.kind = study``. That is what lets a resumed study re-attach to its runs.

``StudyTracker`` is the driver's side (the experiment, the parent and config runs, environment.json);
a trial writes its own run with ``study.trials.mlflow_run.TrialRun``, and ``study.record.tune_callback``
records from the driver what a worker cannot.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from study.record.layout import (
    ARCH_TAG,
    BEST_CONFIG_TAG,
    CANDIDATE_TAG,
    CODE_VERSION_TAG,
    CONFIG_HASH_TAG,
    DEPTH_TAG,
    EXPERIMENT_KIND_TAG,
    FAMILY_TAG,
    GIT_COMMIT_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    PHASE_TAG,
    RECORD_VERSION,
    RECORD_VERSION_TAG,
    RUN_NAME_TAG,
    SELECTED_TAG,
    STATUS_TAG,
    STOP_REASON_TAG,
    STUDY_EFFICIENCY_METRIC,
    STUDY_HASH_TAG,
    STUDY_TAG,
    SUMMARY_METRICS,
    TAG,
    TRAINING_EXPERIMENT,
    below_chance,
    factor_tag,
    phase_tag,
)
from study.record.lease import StudyLease
from study.record.redact import mask_url
from study.record.store import open_client
from study.spec.extension import compare_specs
from study.spec.schema import StudySpec

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    """The study file or its data do not match what the store recorded for this study (exit code 2)."""


# ------------------------------------------------------------------ the driver
class StudyTracker:
    def __init__(self, tracking_uri: str, spec: StudySpec, spec_file: Path, study_dir: Path) -> None:
        self.tracking_uri, self.spec, self.spec_file, self.study_dir = tracking_uri, spec, spec_file, study_dir
        self.client = open_client(tracking_uri)  # a fresh sqlite store is created whole, by one driver
        self.experiment_id = ""
        self.parent_run_id = ""
        self.resumed = False
        self.lease: StudyLease | None = None
        self.parent_tags: dict[str, str] = {}
        self.parent_params: dict[str, str] = {}

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
        """Hold the study's lease in the store (``study.record.lease``); a note if a stale one was taken over."""
        self.experiment_id = self._experiment()
        self.lease = StudyLease(self.client, self.experiment_id, self.spec.name, on_lost=on_lost)
        return self.lease.acquire()

    def fence(self) -> None:
        """Before a write that ends a run, a trial or a phase: raise ``LeaseLost`` unless this driver still holds
        the study (another driver took it over while this one was paused or cut off)."""
        if self.lease is not None:
            self.lease.check()

    # -- the parent run
    def find_parent(self) -> Run | None:
        if not self.experiment_id:
            self.experiment_id = self._experiment()
        parents = find_runs(self.client, self.experiment_id, kind="study")
        return parents[0] if parents else None

    def check_resumable(self, parent: Run, fingerprint: str) -> list[str]:
        """Refuse (``StudyConflict``) a rerun that would mix incompatible work into a study's record: another
        record version, other data, an edit that invalidates finished runs. Returns the additions of an
        edit that extends the study (see ``study.spec.extension``), for the driver's note."""
        tags, name = parent.data.tags, self.spec.name
        recorded = int(tags.get(RECORD_VERSION_TAG, "1"))
        if recorded != RECORD_VERSION:
            raise StudyConflict(
                f"study {name!r} in {mask_url(self.tracking_uri)} was recorded by code "
                f"{tags.get(CODE_VERSION_TAG, 'before 0.2')} (record version {recorded}); this code writes record "
                f"version {RECORD_VERSION}, whose configurations mean something else (docs/study.md, 'Record "
                "versions'): finish it with that version, rerun with --restart, or give the study another name")
        old_fingerprint = parent.data.params.get("data_fingerprint")
        if old_fingerprint and old_fingerprint != fingerprint:
            raise StudyConflict(
                f"study {name!r}: its data changed since the study started ({self.spec.data.corpus}: fingerprint "
                f"{old_fingerprint[:12]} -> {fingerprint[:12]}); runs on other data cannot join its record: restore "
                "the data, rerun with --restart, or give the study another name")
        if tags.get(STUDY_HASH_TAG) == self.spec.study_hash():
            return []
        old = self._recorded_spec(parent)
        change = compare_specs(old, self.spec.model_dump(mode="json"))
        if change.invalid is not None:
            raise StudyConflict(
                f"study {name!r} in {mask_url(self.tracking_uri)} was run from a different study file: "
                f"{change.invalid} would change what its finished runs mean; rerun with --restart to start it over, "
                "or give the study another name (additive edits: docs/study.md, 'Extend a study')")
        return change.additions

    def _recorded_spec(self, parent: Run) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as d:
            try:
                path = self.client.download_artifacts(parent.info.run_id, "spec.json", d)
                return json.loads(Path(path).read_text())
            except (MlflowException, OSError, ValueError) as e:
                raise StudyConflict(f"study {self.spec.name!r}: its recorded spec.json cannot be read ({e}); "
                                    "rerun with --restart") from None

    def open(self, restart: bool = False, environment: dict[str, Any] | None = None,
             data_params: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> str:
        """Find or create the parent run (under the lease); returns the parent run's id. Check
        ``check_resumable`` first: this writes."""
        name = self.spec.name
        if self.lease is None:
            self.acquire_lease()
        parent = self.find_parent()
        if parent is not None and restart:
            self.fence()
            for run in self.client.search_runs([self.experiment_id], max_results=50_000):
                self.client.delete_run(run.info.run_id)
            parent = None
        study_tags = {STUDY_HASH_TAG: self.spec.study_hash(), RECORD_VERSION_TAG: str(RECORD_VERSION),
                      **(tags or {})}
        if environment and environment.get("git_commit"):
            study_tags[GIT_COMMIT_TAG] = environment["git_commit"]
        self.fence()
        if parent is not None:
            self.parent_run_id, self.resumed = parent.info.run_id, True
            self.client.log_batch(self.parent_run_id, tags=[RunTag(k, v) for k, v in study_tags.items()])
            self.client.update_run(self.parent_run_id, status="RUNNING")
            self._close_abandoned_runs()
        else:
            run = self.client.create_run(self.experiment_id, run_name=name, tags={
                KIND_TAG: "study", STUDY_TAG: name, RUN_NAME_TAG: name, **study_tags})
            self.parent_run_id = run.info.run_id
            self.client.log_batch(self.parent_run_id, params=as_params(data_params or {}))
        self._log_spec(environment)
        parent = self.client.get_run(self.parent_run_id)
        self.parent_tags, self.parent_params = dict(parent.data.tags), dict(parent.data.params)
        return self.parent_run_id

    def _log_spec(self, environment: dict[str, Any] | None) -> None:
        """study.yaml, spec.json and environment.json of the latest driver (an extended study's file replaces
        the earlier one; spec.json is what the next rerun compares against)."""
        staging = self.study_dir / "parent"
        staging.mkdir(parents=True, exist_ok=True)
        if self.spec_file.is_file():
            shutil.copyfile(self.spec_file, staging / "study.yaml")
        (staging / "spec.json").write_text(self.spec.to_json())
        (staging / "environment.json").write_text(json.dumps(environment or {}, indent=2, default=str))
        for f in ("study.yaml", "spec.json", "environment.json"):
            if (staging / f).is_file():
                self.client.log_artifact(self.parent_run_id, str(staging / f))
        shutil.rmtree(staging, ignore_errors=True)

    def _close_abandoned_runs(self) -> None:
        """Trial runs a stopped or killed driver left RUNNING (it could not close them: killed, or its store was
        unreachable) are marked interrupted; the trial re-opens its run when it runs again."""
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=50_000):
            if run.data.tags.get(KIND_TAG) == "trial":
                self._mark_interrupted(run.info.run_id)

    def _mark_interrupted(self, run_id: str) -> None:
        """A trial run that stopped without ending: interrupted (KILLED), re-opened when its trial runs again."""
        self.client.log_batch(run_id, tags=[RunTag(STATUS_TAG, "interrupted"), RunTag(STOP_REASON_TAG, "interrupted")])
        self.client.set_terminated(run_id, status="KILLED")

    def code_versions(self) -> dict[str, int]:
        """Trial runs per code version that trained them (``a -> b`` for a run resumed on newer code)."""
        counts: dict[str, int] = {}
        for run in self.trial_runs():
            version = run.data.tags.get(CODE_VERSION_TAG, "unrecorded")
            counts[version] = counts.get(version, 0) + 1
        return counts

    # -- phases
    def mark_phase_done(self, phase: str) -> None:
        self.fence()
        self.client.set_tag(self.parent_run_id, phase_tag(phase), "done")

    def mark_phase_failed(self, phase: str, summary: str) -> None:
        self.fence()
        self.client.set_tag(self.parent_run_id, phase_tag(phase), f"failed: {summary}"[:5000])

    def close(self, status: str = "FINISHED") -> None:
        """End the parent run and every run still RUNNING under it: configuration runs with the study's status
        (re-opened when the study grows), trial runs as interrupted (re-opened on resume). A driver that lost
        its lease writes nothing: the study is another driver's now."""
        try:
            if self.parent_run_id and not (self.lease is not None and self.lease.lost):
                self.fence()
                for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'",
                                                   max_results=50_000):
                    if run.info.run_id == self.parent_run_id:
                        continue
                    if run.data.tags.get(KIND_TAG) == "trial":
                        self._mark_interrupted(run.info.run_id)
                    else:
                        self.client.set_terminated(run.info.run_id, status=status)
                self.client.set_terminated(self.parent_run_id, status=status)
        finally:
            if self.lease is not None:
                self.lease.release()

    # -- trial and config runs
    def trial_runs(self, phase: str | None = None) -> list[Run]:
        return find_runs(self.client, self.experiment_id, kind="trial", **({"phase": phase} if phase else {}))

    def trial_run(self, key: str) -> Run | None:
        runs = find_runs(self.client, self.experiment_id, kind="trial", trial_id=key)
        return runs[0] if runs else None

    def config_run(self, phase: str, config: Any, params: dict[str, Any], factors: dict[str, Any] | None = None,
                   extra_tags: dict[str, str] | None = None) -> str:
        self.fence()
        existing = find_runs(self.client, self.experiment_id, kind="config", phase=phase,
                             config_hash=config.config_hash)
        if existing:
            run_id = existing[0].info.run_id
            if extra_tags and SELECTED_TAG in extra_tags:
                self.client.set_tag(run_id, SELECTED_TAG, extra_tags[SELECTED_TAG])
            if existing[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {PARENT_RUN_TAG: self.parent_run_id, KIND_TAG: "config", PHASE_TAG: phase,
                STUDY_TAG: self.spec.name, CONFIG_HASH_TAG: config.config_hash, ARCH_TAG: config.arch,
                DEPTH_TAG: str(config.depth), FAMILY_TAG: config.family, CANDIDATE_TAG: config.candidate_activation,
                **(extra_tags or {})}
        tags |= {factor_tag(k): str(v) for k, v in (factors or {}).items()}
        name = f"{config.family}-{phase}-{config.config_hash[:8]}"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.client.log_batch(run.info.run_id, params=as_params(params))
        return run.info.run_id

    def mark_unselected(self, phase: str, selected: set[str]) -> None:
        """Config runs that an extended search no longer selects keep their runs, marked ``selected=false``."""
        for run in find_runs(self.client, self.experiment_id, kind="config", phase=phase):
            if run.data.tags.get(CONFIG_HASH_TAG) not in selected and run.data.tags.get(SELECTED_TAG) != "false":
                self.fence()
                self.client.set_tag(run.info.run_id, SELECTED_TAG, "false")

    def update_config_summary(self, config_run_id: str) -> dict[str, float]:
        """A config run's summary over its completed seeds (valid/test BPC mean, sd, n), so MLflow's collapsed
        table and charts show it; runs not below chance do not count (one chance rule)."""
        trials = [r for r in self.client.search_runs([self.experiment_id],
                                                     f"tags.`{PARENT_RUN_TAG}` = '{config_run_id}'",
                                                     max_results=10_000)
                  if r.data.tags.get(KIND_TAG) == "trial" and r.data.tags.get(STATUS_TAG) == "completed"]
        bar = self.parent_params.get("unigram_entropy_bits")
        valid = [r.data.metrics["best_valid_bpc"] for r in trials
                 if below_chance(r.data.metrics.get("best_valid_bpc"), bar)]
        test = [r.data.metrics["test_bpc"] for r in trials if below_chance(r.data.metrics.get("test_bpc"), bar)]
        summary = _summary("valid_bpc", valid) | _summary("test_bpc", test) | {"n_seeds": float(len(valid))}
        self.fence()
        self.client.log_batch(config_run_id, metrics=[Metric(k, v, now_ms(), 0) for k, v in summary.items()])
        return summary

    def summarize_study(self) -> str | None:
        """The parent run carries its best configuration's summary (the lowest mean valid BPC among the
        selected evaluate configurations, else the ablation's), and names it; returns its run name."""
        for phase in ("evaluate", "ablation"):
            configs = [r for r in find_runs(self.client, self.experiment_id, kind="config", phase=phase)
                       if r.data.tags.get(SELECTED_TAG) != "false" and r.data.metrics.get("valid_bpc_mean") is not None]
            if configs:
                best = min(configs, key=lambda r: r.data.metrics["valid_bpc_mean"])
                metrics = {k: best.data.metrics[k] for k in SUMMARY_METRICS if k in best.data.metrics}
                self.fence()
                self.client.log_batch(self.parent_run_id, tags=[RunTag(BEST_CONFIG_TAG, best.info.run_name)],
                                      metrics=[Metric(k, v, now_ms(), 0) for k, v in metrics.items()])
                return best.info.run_name
        return None

    def log_efficiency(self, value: float) -> None:
        self.fence()
        self.client.log_metric(self.parent_run_id, STUDY_EFFICIENCY_METRIC, value)


def _summary(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    mean = statistics.fmean(values)
    out = {f"{name}_mean": mean}
    if len(values) > 1:
        out[f"{name}_sd"] = statistics.stdev(values)
    return out


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


def code_version(environment: dict[str, Any]) -> str:
    """``0.2.0+g1a2b3c4d5e`` (``.dirty`` when the checkout had changes): the code that trained a run."""
    import nlstm

    commit, dirty = environment.get("git_commit"), environment.get("git_dirty")
    return nlstm.__version__ + (f"+g{commit[:10]}{'.dirty' if dirty else ''}" if commit else "")


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
