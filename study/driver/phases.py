"""A study's phases in one Ray Tune experiment: one set of trial processes from the first search trial to
the last evaluation seed.

- ``search``: one Optuna study per family (or one for the whole space), each trial a configuration
  sampled with the tuning seed; the family's scheduler (ASHA, median stopping or none) stops poor
  trials early (``study.search.scheduler``).
- ``evaluate``: the top-k search configurations (overall, per arch or per family), each re-run
  with the evaluation seeds at the evaluate phase's full training budget.
- ``ablation``: every cell of the factor grid, each run with the ablation seeds.

``study.search.searcher.StudySearcher`` hands Tune the trials phase after phase from the record; Tune
reuses its trial processes across all of them (``reuse_actors``). Every driver starts a new Tune
experiment (``<ray>/run-<time>``, kept for its logs and tracebacks, never read again): resuming is
the searcher's job, from the record, so a study continues under any code version with the same
record version, and Ray's folders can be deleted at any time.

A trial whose worker or node died is restarted by Tune (up to ``TRIAL_RESTARTS`` times) when there is
capacity for it again, from its checkpoint. A phase is recorded as done on the parent run
(``nlstm.phase.<phase> = done``) when its trials mostly succeeded; otherwise it is recorded as failed
and the study stops with ``StudyFailed``: one line naming the commonest failure reason.
"""

from __future__ import annotations

import functools
import math
import re
import signal
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ray import tune
from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

from nlstm.data import Corpus
from study.driver.cluster import Storage
from study.driver.progress import ProgressLine
from study.record.layout import (
    CONFIG_HASH_TAG,
    FAIL_REASON_TAG,
    FAMILY_TAG,
    SELECTED_TAG,
    STATUS_TAG,
    TRIAL_ID_TAG,
    factors_of,
)
from study.record.redact import mask_url
from study.record.tracker import StudyTracker, find_runs
from study.record.tune_callback import TrackingCallback
from study.search.scheduler import FamilyScheduler
from study.search.searcher import METRIC, MODE, StudySearcher, select_top
from study.spec.schema import StudySpec
from study.trials.checkpoints import CheckpointStore, model_file_from_checkpoint
from study.trials.corpus import data_key, load_study_corpus
from study.trials.trainable import TrialContext, run_trial

# Tune restarts a trial whose worker or node died (from its checkpoint) this many times. Tune cannot tell
# those from the trial's own errors, which it restarts too: a diverged trial then fails again at once from
# its record, and any other failure is retried up to MAX_ATTEMPTS attempts in all, counted on its run.
TRIAL_RESTARTS = 3


class StudyInterrupted(KeyboardInterrupt):
    """A signal stopped the study before its trials ended (Ctrl+C, SIGTERM): rerun the command to resume."""


class StudyFailed(RuntimeError):
    """A phase ended without a result worth going on from; the message is one line."""


def _shape(reason: str) -> str:
    """A failure reason with its numbers masked, so "nan at step 3 (lr 1e+30)" and "nan at step 7
    (lr 2e+30)" count as one kind of failure."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", reason)


@dataclass
class PhaseOutcome:
    """How a phase's trials ended, from the record."""

    phase: str
    completed: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> reason
    unfinished: list[str] = field(default_factory=list)  # interrupted, or never started

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


def outcome_of(tracker: StudyTracker, phase: str, keys: list[str]) -> PhaseOutcome:
    """How the trials ``keys`` of ``phase`` ended, as their runs in the store say."""
    outcome = PhaseOutcome(phase)
    runs = {r.data.tags.get(TRIAL_ID_TAG): r for r in tracker.trial_runs(phase)}
    for key in keys:
        tags = runs[key].data.tags if key in runs else {}
        status = tags.get(STATUS_TAG)
        if status == "completed":
            outcome.completed.append(key)
        elif status == "pruned":
            outcome.pruned.append(key)
        elif status == "failed":
            outcome.failed[key] = tags.get(FAIL_REASON_TAG) or "unknown error"
        else:
            outcome.unfinished.append(key)
    return outcome


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
    storage: Storage  # the record's Ray folder root (Tune experiments go to <storage>/run-<time>)
    checkpoints: CheckpointStore
    optuna_storage: Any = None  # the search's Optuna storage (study.search.optuna_store)
    optuna_location: str = ""  # how to name it to the user (no password)
    code_version: str = ""
    git_commit: str | None = None
    train_time_s: float = 0.0  # trial training done by this driver (for the study's efficiency)
    _corpora: dict[str, Corpus] = field(default_factory=dict)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def corpus_for(self, overrides: dict[str, Any]) -> Corpus:
        """The study's corpus with a trial's data overrides (an ablated ``dependency_length``), loaded once."""
        key = data_key(overrides)
        if key == data_key({}):
            return self.corpus
        if key not in self._corpora:
            self._corpora[key] = load_study_corpus(self.spec, self.data_dir, overrides=overrides, cached=False)
        return self._corpora[key]

    def fingerprint(self, overrides: dict[str, Any]) -> str:
        return self.corpus_for(overrides).fingerprint

    @functools.cached_property
    def unigram_bits(self) -> float:
        return self.corpus.unigram_entropy_bits()

    def context(self) -> TrialContext:
        t = self.tracker
        return TrialContext(self.spec, t.tracking_uri, t.experiment_id, self.checkpoints,
                            t.lease.owner if t.lease else "", self.code_version, self.git_commit, self.data_dir,
                            threads=max(1, int(self.cpus_per_trial)),
                            device="cuda" if self.gpus_per_trial > 0 else "cpu")


def _search_scheduler(spec: StudySpec) -> Any:
    """A family's scheduler, as the study file asks (None: every trial trains to the search's fidelity)."""
    if spec.search is None or spec.search.scheduler.type == "none":
        return None
    s, epochs = spec.search.scheduler, spec.search.train.epochs
    grace = min(s.grace_period, epochs)
    if s.type == "asha":
        return lambda: ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace,
                                     reduction_factor=s.reduction_factor)
    return lambda: MedianStoppingRule(time_attr="epoch", grace_period=grace,
                                      min_samples_required=s.min_samples_required)


def run_phases(run: StudyRun, phases: list[str]) -> None:
    """Run every phase in ``phases`` that has work left, in one Tuner; raise ``StudyFailed`` when a phase
    ends without a usable result, ``StudyInterrupted`` when a signal stopped it."""
    scheduler = FamilyScheduler(_search_scheduler(run.spec))
    searcher: StudySearcher | None = None
    progress = None if run.verbose else ProgressLine(lambda phase: searcher.totals.get(phase, (0, 0)),
                                                     scheduler.stopped,
                                                     recorded_best=lambda phase: searcher.recorded_best.get(phase))

    def phase_ended(searcher: StudySearcher, phase: str) -> None:
        if progress is not None:
            progress.end_phase(phase)
        finish_phase(run, searcher, phase)

    searcher = StudySearcher(run, phases, run.max_concurrent, scheduler.stopped, phase_ended)
    if searcher.current is None:  # everything was done already (the summaries were printed)
        if searcher.failure:
            raise StudyFailed(searcher.failure)
        return
    resources = {"cpu": run.cpus_per_trial} | ({"gpu": run.gpus_per_trial} if run.gpus_per_trial else {})
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=run.context()), resources)
    callbacks: list[tune.Callback] = [TrackingCallback(run.tracker.tracking_uri, run.tracker.experiment_id,
                                                       run.spec.name, scheduler.stopped, run.tracker.fence)]
    if progress is not None:
        callbacks.append(progress)
    tuner = tune.Tuner(
        trainable,
        # max_concurrent_trials: Tune then keeps that many trials pending for the searcher (one otherwise, which
        # starts the second slot's trial only when the first one ends)
        tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=searcher, scheduler=scheduler,
                                    num_samples=-1, reuse_actors=True, max_concurrent_trials=run.max_concurrent,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        # One experiment per driver, named for its record: two drivers on one cluster starting in the same second
        # must not share Ray's staging folder (<session>/artifacts/<start time>/<name>).
        run_config=tune.RunConfig(name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{run.tracker.parent_run_id[:8]}",
                                  storage_path=run.storage.path,
                                  storage_filesystem=run.storage.filesystem, verbose=2 if run.verbose else 0,
                                  callbacks=callbacks, failure_config=tune.FailureConfig(max_failures=TRIAL_RESTARTS)),
    )
    handler = signal.getsignal(signal.SIGINT)
    results = tuner.fit()
    if _tune_was_interrupted(handler):  # Tune returns normally after Ctrl+C
        raise StudyInterrupted("interrupted")
    run.train_time_s += sum(float((r.metrics or {}).get("train_time_this_run_s", 0.0)) for r in results)
    if searcher.failure:
        raise StudyFailed(searcher.failure)
    if searcher.current is not None:
        raise StudyFailed(f"{searcher.current.phase}: Tune stopped before the phase's trials ended; rerun to resume")


def _trial_name(trial: Any) -> str:
    return (trial.config or {}).get("trial_key") or trial.trial_id


def _tune_was_interrupted(handler_before_fit: Any) -> bool:
    """Whether Tune's fit ended on SIGINT (Ctrl+C, or SIGTERM, see study.run.handle_signals).

    Tune's own SIGINT handler (installed by ``fit``) puts back the handler from before ``fit`` when
    it receives the signal and only then; it is also put back here. Nothing else (a damaged state, a
    full disk) is called an interruption."""
    import os

    if os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") not in ("", "0"):
        return False
    interrupted = signal.getsignal(signal.SIGINT) is handler_before_fit
    signal.signal(signal.SIGINT, handler_before_fit)
    return interrupted


def finish_phase(run: StudyRun, searcher: StudySearcher, phase: str) -> None:
    """Record how ``phase`` ended (done, or failed with its commonest reason) and print its summary."""
    if searcher.failure:  # the phase could not start (no configuration to evaluate, say)
        run.tracker.mark_phase_failed(phase, searcher.failure)
        return
    keys = searcher.planned_keys(phase)
    outcome = outcome_of(run.tracker, phase, keys)
    run.say(phase_summary(run, phase))
    problem = outcome.problem() if outcome.total else None  # nothing ended yet: interrupted, or still to retry
    if problem:
        run.tracker.mark_phase_failed(phase, problem)
        details = f"MLflow tag nlstm.fail_reason of the trial runs; tracebacks under {mask_url(run.storage.location)}"
        searcher.failure = f"{phase}: {problem} (details: {details}){outcome.rerun_hint()}"
        return
    if not outcome.unfinished:
        run.tracker.mark_phase_done(phase)
    if phase == "search":
        save_best_models(run, searcher)


def save_best_models(run: StudyRun, searcher: StudySearcher) -> None:
    """``model.pt`` of the search trials evaluate re-runs (or of the best one) as artifacts of their runs."""
    rows = searcher.usable(searcher._search_rows())
    chosen = select_top(run.spec, rows) if run.spec.evaluate else rows[:1]
    for row in chosen:
        record = run.tracker.trial_run(row["key"])
        if record is None or any(a.path == "model.pt" for a in run.tracker.client.list_artifacts(record.info.run_id)):
            continue
        with tempfile.TemporaryDirectory() as d:
            meta = run.checkpoints.fetch(row["key"], Path(d) / "checkpoint")
            out = model_file_from_checkpoint(Path(d) / "checkpoint", Path(d) / "model.pt") if meta else None
            if out is not None:
                run.tracker.fence()
                run.tracker.client.log_artifact(record.info.run_id, str(out))


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


def _unselected(tracker: StudyTracker, phase: str) -> set[str]:
    configs = find_runs(tracker.client, tracker.experiment_id, kind="config", phase=phase)
    return {r.data.tags.get(CONFIG_HASH_TAG) for r in configs if r.data.tags.get(SELECTED_TAG) == "false"}


def phase_rows(tracker: StudyTracker, phase: str) -> list[dict[str, Any]]:
    """One row per configuration of a phase, from its MLflow trial runs."""
    groups: dict[str, dict[str, Any]] = {}
    factors = _factor_text(tracker, phase) if phase == "ablation" else {}
    unselected = _unselected(tracker, phase) if phase == "evaluate" else set()
    for r in find_runs(tracker.client, tracker.experiment_id, kind="trial", phase=phase):
        tags, metrics = r.data.tags, r.data.metrics
        if tags.get(CONFIG_HASH_TAG) in unselected or "-superseded-" in tags.get(TRIAL_ID_TAG, ""):
            continue
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


def phase_summary(run: Any, phase: str, limit: int = 8) -> str:
    rows = phase_rows(run.tracker, phase)
    if not rows:
        return f"[{phase}] no trial runs recorded"
    header = "trial" if phase == "search" else "configuration (seeds)"
    lines = [f"[{phase}] {'best trials' if phase == 'search' else 'results, mean ± sd over seeds'}:",
             f"  {header:<30} {'family':<14} {'params':>9} {'lr':>9} {'valid bpc':>15} {'test bpc':>15}  status"]
    if any(g["factors"] for g in rows[:limit]):
        lines[-1] += "  factors"
    for g in rows[:limit]:
        name = g["key"] if phase == "search" else f"{(g['config_hash'] or '?')[:8]} ({len(g['valid'])})"
        status = ",".join(sorted({s or "?" for s in g["status"]}))
        params = f"{int(g['num_params']):,}" if g["num_params"] else "-"
        lr = f"{float(g['lr']):.2e}" if g["lr"] not in (None, "None") else "-"
        lines.append(f"  {name:<30} {g['family'] or '-':<14} {params:>9} {lr:>9} {_mean_sd(g['valid']):>15} "
                     f"{_mean_sd(g['test']):>15}  {status}" + (f"  {g['factors']}" if g["factors"] else ""))
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in MLflow")
    return "\n".join(lines)

