"""The three phases of a study, each one Ray Tune experiment under ``studies/<name>/ray/<phase>``
(with ``--storage``: ``<storage>/<name>/<parent run id>/<phase>``).

- ``search``: Optuna samples configurations (``PruneAwareOptunaSearch``), a scheduler (ASHA,
  median stopping or none) stops poor trials early; every trial uses the tuning seed.
- ``evaluate``: the top-k search configurations (overall, per arch or per family), each re-run
  with the evaluation seeds at the evaluate phase's full training budget.
- ``ablation``: every cell of the factor grid, each run with the ablation seeds.

A trial whose worker or node died is restarted by Tune from its last checkpoint (up to
``TRIAL_RESTARTS`` times) when there is capacity for it again.

A phase whose experiment exists is resumed (``Tuner.restore``): finished trials are kept,
unfinished ones continue from their last checkpoint, and errored ones run again: a diverged
trial fails again at once from its record (a divergence would recur), any other failure is
retried up to ``MAX_ATTEMPTS`` times in all (see ``study.trial``).

A phase is recorded as done on the parent run (``nlstm.phase.<phase> = done``), and skipped when
the study runs again, only when every trial Ray ran has its run in the store and the phase's
trials mostly succeeded; otherwise the phase is recorded as failed and the study stops with
``StudyFailed``: one line naming the commonest failure reason.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import signal
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

from nlstm.data import Corpus
from study.cluster import Storage
from study.layout import (
    CONFIG_HASH_TAG,
    FAIL_REASON_TAG,
    FAMILY_TAG,
    SOURCE_TRIAL_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
    factors_of,
    trial_key_of,
)
from study.schema import StudySpec
from study.searcher import PruneAwareOptunaSearch
from study.space import DefineByRun, TrialConfig, ablation_cells, make_sampler, num_samples, resolve
from study.tracking import StudyTracker, find_runs
from study.tracking_callback import error_line
from study.trial import PlannedTrial, TrialContext, data_key, load_study_corpus, model_file_from_checkpoint, run_trial

METRIC, MODE = "best_valid_bpc", "min"  # the spec's `valid_bpc`: each trial's best epoch so far
# Tune restarts a trial whose worker or node died (from its last checkpoint) this many times. Tune
# cannot tell those from the trial's own errors, which it restarts too: a diverged trial then fails
# again at once from its record (a few seconds for a new actor), and any other failure is retried
# up to MAX_ATTEMPTS attempts in all, counted on the trial's run (study.trial).
TRIAL_RESTARTS = 3


class StudyInterrupted(KeyboardInterrupt):
    """Tune stopped a phase before all its trials ended (Ctrl+C): rerun the command to resume."""


class StudyFailed(RuntimeError):
    """A phase ended without a result worth recording as done; the message is one line."""


def _shape(reason: str) -> str:
    """A failure reason with its numbers masked, so "nan at step 3 (lr 1e+30)" and "nan at step 7
    (lr 2e+30)" count as one kind of failure."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", reason)


@dataclass
class PhaseOutcome:
    """How a phase's trials ended, from Ray's results, checked against the store."""

    phase: str
    completed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason

    @property
    def total(self) -> int:
        return len(self.completed) + len(self.pruned) + len(self.failed)

    def problem(self) -> str | None:
        """Why the phase is not done: no trial finished, or most failed."""
        if not self.total or (self.completed and len(self.failed) * 2 <= self.total):
            return None
        groups = Counter(_shape(r) for r in self.failed.values()).most_common(1)
        commonest = ""
        if groups:
            example = next(r for r in self.failed.values() if _shape(r) == groups[0][0])
            commonest = f"; commonest failure ({groups[0][1]}x): {example}"
        if not self.completed:
            return f"no trial of {self.total} completed ({len(self.failed)} failed, {len(self.pruned)} stopped early)" \
                   + commonest
        return f"{len(self.failed)} of {self.total} trials failed{commonest}"

    def rerun_hint(self) -> str:
        """A rerun retries failures that may be transient; a divergence or a trial that gave up would recur."""
        retryable = [r for r in self.failed.values() if not r.startswith(("diverged", "gave up"))]
        if retryable:
            return f"; rerun to retry the {len(retryable)} trial(s) whose failure may be transient"
        return "; a rerun would fail the same way: change the study (e.g. the learning-rate range)"


@dataclass
class StudyRun:
    """What the phases need from the driver."""

    spec: StudySpec
    study_dir: Path
    tracker: StudyTracker
    corpus: Corpus
    data_dir: str | None
    cpus_per_trial: float
    gpus_per_trial: float
    max_concurrent: int
    verbose: bool
    out: TextIO
    storage: Storage | None = None  # where the phases' Ray experiments go (default: <study_dir>/ray)
    optuna_storage: Any = None  # the search's Optuna storage (study.optuna_store)
    outcome: PhaseOutcome | None = None  # of the phase that ran last

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def __post_init__(self) -> None:
        if self.storage is None:
            self.storage = Storage(str(self.study_dir / "ray"), str(self.study_dir / "ray"))

    def context(self, phase: str, **kwargs: Any) -> TrialContext:
        t = self.tracker
        kwargs.setdefault("data_fingerprints", {data_key({}): self.corpus.fingerprint})
        return TrialContext(self.spec, phase, t.tracking_uri, t.experiment_id, t.parent_run_id, self.data_dir,
                            threads=max(1, int(self.cpus_per_trial)),
                            device="cuda" if self.gpus_per_trial > 0 else "cpu", **kwargs)


def _trial_name(trial: Any) -> str:
    return trial_key_of(trial.config) or trial.trial_id


def _fit(run: StudyRun, phase: str, context: TrialContext, total: int, tune_config: tune.TuneConfig,
         param_space: dict[str, Any] | None = None) -> tune.ResultGrid:
    from study.progress import ProgressLine
    from study.tracking_callback import TrackingCallback

    resources = {"cpu": run.cpus_per_trial} | ({"gpu": run.gpus_per_trial} if run.gpus_per_trial else {})
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), resources)
    storage = run.storage
    path = storage.join(phase)
    if tune.Tuner.can_restore(path.path, storage_filesystem=storage.filesystem):
        run.say(f"[{phase}] resuming the trials in {path.location}")
        try:
            tuner = tune.Tuner.restore(path.path, trainable=trainable, param_space=param_space, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage.filesystem)
        except (AttributeError, ImportError, pickle.UnpicklingError) as e:  # Tune pickles objects by module path
            raise StudyFailed(f"{phase}: the trial state in {path.location} was saved by another version of this code "
                              f"and cannot be read ({type(e).__name__}: {e}); finish the study with that version, or "
                              "rerun with --restart, which discards this study's earlier runs") from None
    else:
        parents = {"*": context.parent_run_id} if phase == "search" else {
            key: context.config_runs[p.config_hash] for key, p in context.planned.items()}
        callbacks: list[tune.Callback] = [TrackingCallback(run.tracker.tracking_uri, run.tracker.experiment_id,
                                                           run.spec.name, phase, parents)]
        if not run.verbose:
            prunes = phase == "search" and run.spec.search.scheduler.type != "none"
            callbacks.append(ProgressLine(phase, total, can_prune=prunes))
        tuner = tune.Tuner(
            trainable, param_space=param_space, tune_config=tune_config,
            run_config=tune.RunConfig(
                name=phase, storage_path=storage.path, storage_filesystem=storage.filesystem,
                verbose=2 if run.verbose else 0, callbacks=callbacks,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS)),
        )
    handler = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    ended = results.num_terminated + results.num_errors
    if ended < total or _tune_was_interrupted(handler):  # Tune returns normally after Ctrl+C
        raise StudyInterrupted(f"{phase}: {ended} of {total} trials ended")
    run.outcome = outcome_of(run, phase, results)
    return results


def _tune_was_interrupted(handler_before_fit: Any) -> bool:
    """Whether Tune's fit ended on SIGINT (Ctrl+C, or SIGTERM, see study.run.handle_signals).

    Tune marks the trials still running at that moment TERMINATED when it stops them, like
    finished ones, so counting ended trials misses an interruption where no trial was pending.
    Tune's own SIGINT handler (installed by ``fit``) puts back the handler from before ``fit`` when
    it receives the signal and only then; it is also put back here for the next phase."""
    if os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") not in ("", "0"):
        return False
    interrupted = signal.getsignal(signal.SIGINT) is handler_before_fit
    signal.signal(signal.SIGINT, handler_before_fit)
    return interrupted


def outcome_of(run: StudyRun, phase: str, results: tune.ResultGrid) -> PhaseOutcome:
    """How the phase's trials ended; raises ``StudyFailed`` if Ray knows of trials that the store
    does not (its folder would then not be this record's cache)."""
    outcome = PhaseOutcome(phase)
    recorded = {r.data.tags.get(TRIAL_ID_TAG): r
                for r in find_runs(run.tracker.client, run.tracker.experiment_id, kind="trial", phase=phase)}
    for r in results:
        m = r.metrics or {}
        key = m.get("trial_key") or trial_key_of(r.config or {}) or "?"
        if r.error is not None:
            record = recorded.get(key)
            reason = record.data.tags.get(FAIL_REASON_TAG) if record is not None else None
            outcome.failed[key] = reason or error_line(str(r.error)) or type(r.error).__name__
        elif m.get("finished"):
            outcome.completed.append(key)
        else:
            outcome.pruned.append(key)
    missing = sorted(k for k in outcome.completed + outcome.pruned + list(outcome.failed) if k not in recorded)
    if missing:
        raise StudyFailed(f"{phase}: {len(missing)} trial(s) that Ray ran have no run in {run.tracker.tracking_uri} "
                          f"({', '.join(missing[:5])}); the Ray folder {run.storage.location} is not this store's "
                          "record: rerun with --restart")
    return outcome


# ------------------------------------------------------------------ search
def _scheduler(spec: StudySpec) -> Any:
    s, epochs = spec.search.scheduler, spec.search.train.epochs
    grace = min(s.grace_period, epochs)
    if s.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=grace,
                             reduction_factor=s.reduction_factor)
    if s.type == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=grace,
                                  min_samples_required=s.min_samples_required)
    return FIFOScheduler()


def run_search(run: StudyRun) -> None:
    spec = run.spec
    total = num_samples(spec)
    searcher = PruneAwareOptunaSearch(space=DefineByRun(spec), metric=METRIC, mode=MODE, sampler=make_sampler(spec),
                                      storage=run.optuna_storage, study_name=spec.name if run.optuna_storage else None)
    tune_config = tune.TuneConfig(
        metric=METRIC, mode=MODE, search_alg=searcher, scheduler=_scheduler(spec), num_samples=total,
        max_concurrent_trials=min(run.max_concurrent, spec.search.max_concurrent or run.max_concurrent),
        reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    results = _fit(run, "search", run.context("search"), total, tune_config)
    rows, checkpoints = [], {}
    for r in results:
        m = r.metrics or {}
        key = m.get("trial_key") or trial_key_of(r.config or {})
        params = {k: v for k, v in (r.config or {}).items() if k != "trial_number"}
        status = "failed" if r.error is not None else ("completed" if m.get("finished") else "pruned")
        if r.checkpoint is not None:
            checkpoints[key] = r.checkpoint
        rows.append({"key": key, "status": status, "params": params, "family": m.get("family"),
                     "best_valid_bpc": m.get("best_valid_bpc", math.inf) if r.error is None else math.inf,
                     "epochs": m.get("epoch", 0),
                     "checkpoint": run.storage.location_of(r.checkpoint.path) if r.checkpoint else None})
    # By best valid BPC whatever the status: a trial stopped early reached its value in fewer epochs,
    # so it is at least as promising as a finished trial with a worse value.
    rows.sort(key=lambda row: row["best_valid_bpc"])
    (run.study_dir / "search_results.json").write_text(json.dumps(rows, indent=1, default=str))
    _save_best_models(run, rows, checkpoints)


def _save_best_models(run: StudyRun, rows: list[dict[str, Any]], checkpoints: dict[str, tune.Checkpoint]) -> None:
    """model.pt of the best search trials (those evaluate will re-run, or the best one) as artifacts
    of their runs and under studies/<name>/best/."""
    chosen = select_top(run.spec, rows) if run.spec.evaluate else rows[:1]
    best_dir = run.study_dir / "best"
    best_dir.mkdir(parents=True, exist_ok=True)
    for row in chosen:
        if row["key"] not in checkpoints:
            continue
        with checkpoints[row["key"]].as_directory() as d:  # downloaded first if the storage is an object store
            out = model_file_from_checkpoint(Path(d), best_dir / f"{row['key']}.pt")
        trial_run = run.tracker.trial_run(row["key"])
        if out is not None and trial_run is not None:
            staging = best_dir / row["key"]
            staging.mkdir(exist_ok=True)
            shutil.copyfile(out, staging / "model.pt")
            run.tracker.client.log_artifact(trial_run.info.run_id, str(staging / "model.pt"))
            shutil.rmtree(staging)


def select_top(spec: StudySpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluate phase's configurations: the top-k rows (by best valid BPC, pruned or not)
    overall, per arch or per family. ``rows`` must be sorted."""
    ev = spec.evaluate
    assert ev is not None
    usable = [r for r in rows if r["status"] != "failed" and math.isfinite(r["best_valid_bpc"])]
    if ev.per == "none":
        return usable[: ev.top_k]
    chosen, counts = [], {}
    for row in usable:
        cfg = resolve(spec, "search", row["params"])
        group = cfg.arch if ev.per == "arch" else cfg.family
        if counts.get(group, 0) < ev.top_k:
            counts[group] = counts.get(group, 0) + 1
            chosen.append(row)
    return chosen


def load_search_rows(run: StudyRun) -> list[dict[str, Any]]:
    path = run.study_dir / "search_results.json"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run the search phase first (--phases search)")
    return json.loads(path.read_text())


# ------------------------------------------------------------------ evaluate and ablation
def _run_planned(run: StudyRun, phase: str, configs: list[tuple[TrialConfig, dict[str, Any], dict[str, str]]],
                 seeds: list[int]) -> None:
    """Config runs for ``configs`` ((config, factors, extra tags)), then every (config, seed) trial,
    the first seed of every configuration before the second."""
    corpora = {data_key({}): run.corpus}  # the study's corpus and every variant a trial overrides
    for cfg, _, _ in configs:
        if data_key(cfg.data) not in corpora:
            corpora[data_key(cfg.data)] = load_study_corpus(run.spec, run.data_dir, overrides=cfg.data)
    planned: dict[str, PlannedTrial] = {}
    config_runs: dict[str, str] = {}
    for cfg, factors, tags in configs:
        solved = cfg.solve(len(corpora[data_key(cfg.data)].vocab))
        params = solved.mlflow_params(seed=0)
        params.pop("seed")
        config_runs[cfg.config_hash] = run.tracker.config_run(phase, cfg, params, factors or None, tags)
    for seed in seeds:
        for cfg, _, _ in configs:
            key = f"{phase}-{cfg.config_hash}-s{seed}"
            planned[key] = PlannedTrial(key, cfg.params, seed, cfg.config_hash)
    context = run.context(phase, planned=planned, config_runs=config_runs,
                          data_fingerprints={key: corpus.fingerprint for key, corpus in corpora.items()})
    tune_config = tune.TuneConfig(metric=METRIC, mode=MODE, num_samples=1, max_concurrent_trials=run.max_concurrent,
                                  reuse_actors=True, trial_name_creator=_trial_name, trial_dirname_creator=_trial_name)
    _fit(run, phase, context, len(planned), tune_config, param_space={"trial_key": tune.grid_search(list(planned))})
    run.tracker.finish_config_runs(phase)


def run_evaluate(run: StudyRun) -> None:
    spec = run.spec
    configs, seen = [], set()
    for row in select_top(spec, load_search_rows(run)):
        cfg = resolve(spec, "evaluate", row["params"])
        if cfg.config_hash not in seen:
            seen.add(cfg.config_hash)
            configs.append((cfg, {}, {SOURCE_TRIAL_TAG: row["key"]}))
    if not configs:
        raise StudyFailed("evaluate: no search trial finished, so there is no configuration to evaluate")
    _run_planned(run, "evaluate", configs, spec.evaluate.seeds)


def run_ablation(run: StudyRun) -> None:
    spec = run.spec
    base: dict[str, Any] = {}
    if spec.ablation.base == "search":
        rows = [r for r in load_search_rows(run) if r["status"] != "failed"]
        if not rows:
            raise StudyFailed("ablation: no search trial finished, so there is no base configuration")
        base = rows[0]["params"]
    cells = ablation_cells(spec, base)
    _run_planned(run, "ablation", [(c.config, c.factors, {}) for c in cells], spec.ablation.seeds)


PHASE_RUNNERS = {"search": run_search, "evaluate": run_evaluate, "ablation": run_ablation}


def run_phase(run: StudyRun, phase: str) -> None:
    if run.tracker.phase_done(phase):
        run.say(f"[{phase}] already done (recorded on the study run); skipping")
        run.say(phase_summary(run, phase))
        return
    run.outcome = None
    PHASE_RUNNERS[phase](run)
    run.say(phase_summary(run, phase))
    problem = run.outcome.problem() if run.outcome else f"{phase}: no trial ran"
    if problem:
        run.tracker.mark_phase_failed(phase, problem)
        details = f"MLflow tag nlstm.fail_reason of the trial runs; tracebacks in {run.storage.join(phase).location}"
        raise StudyFailed(f"{phase}: {problem} (details: {details}){run.outcome.rerun_hint() if run.outcome else ''}")
    run.tracker.mark_phase_done(phase)


# ------------------------------------------------------------------ summaries
def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _factor_text(tracker: StudyTracker, phase: str) -> dict[str, str]:
    """config_hash -> its ablation factors other than those the family names ("budget=50000 dependency_length=10")."""
    out = {}
    for r in find_runs(tracker.client, tracker.experiment_id, kind="config", phase=phase):
        factors = {k: v for k, v in factors_of(r.data.tags).items() if k not in ("arch", "depth")}
        out[r.data.tags.get(CONFIG_HASH_TAG, "?")] = " ".join(f"{k}={v}" for k, v in sorted(factors.items()))
    return out


def phase_rows(tracker: StudyTracker, phase: str) -> list[dict[str, Any]]:
    """One row per configuration of a phase, from its MLflow trial runs."""
    groups: dict[str, dict[str, Any]] = {}
    factors = _factor_text(tracker, phase) if phase == "ablation" else {}
    for r in find_runs(tracker.client, tracker.experiment_id, kind="trial", phase=phase):
        tags, metrics = r.data.tags, r.data.metrics
        g = groups.setdefault(tags.get(CONFIG_HASH_TAG, "?"), {
            "family": tags.get(FAMILY_TAG), "config_hash": tags.get(CONFIG_HASH_TAG),
            "num_params": metrics.get("num_params"), "key": tags.get(TRIAL_ID_TAG),
            "lr": r.data.params.get("lr"), "valid": [], "test": [], "status": [],
            "factors": factors.get(tags.get(CONFIG_HASH_TAG, "?"), "")})
        g["valid"].append(metrics.get("best_valid_bpc"))
        g["test"].append(metrics.get("test_bpc"))
        g["status"].append(tags.get(STATUS_TAG))
    rows = list(groups.values())
    rows.sort(key=lambda g: min([v for v in g["valid"] if v is not None] or [math.inf]))
    return rows


def phase_summary(run: StudyRun, phase: str, limit: int = 8) -> str:
    rows = phase_rows(run.tracker, phase)
    if not rows:
        return f"[{phase}] no trial runs recorded"
    header = "trial" if phase == "search" else "configuration (seeds)"
    lines = [f"[{phase}] {'best trials' if phase == 'search' else 'results, mean ± sd over seeds'}:",
             f"  {header:<28} {'family':<12} {'params':>9} {'lr':>9} {'valid bpc':>15} {'test bpc':>15}  status"]
    if any(g["factors"] for g in rows[:limit]):
        lines[-1] += "  factors"
    for g in rows[:limit]:
        name = g["key"] if phase == "search" else f"{g['config_hash']} ({len(g['valid'])})"
        status = ",".join(sorted({s or "?" for s in g["status"]}))
        params = f"{int(g['num_params']):,}" if g["num_params"] else "-"
        lr = f"{float(g['lr']):.2e}" if g["lr"] not in (None, "None") else "-"
        lines.append(f"  {name:<28} {g['family'] or '-':<12} {params:>9} {lr:>9} {_mean_sd(g['valid']):>15} "
                     f"{_mean_sd(g['test']):>15}  {status}" + (f"  {g['factors']}" if g["factors"] else ""))
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in MLflow")
    return "\n".join(lines)
