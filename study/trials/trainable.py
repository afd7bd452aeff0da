"""One trial: a Tune function trainable that trains one configuration with one seed.

Its Tune config says everything about it (``study.search.searcher`` builds it): the trial key, phase,
family, chosen values, seed, the MLflow run it belongs under and the fingerprint of the data it
must train on. It solves the width from the budget, sets torch's threads to its CPU allotment,
trains with ``nlstm.trainer.Trainer`` and, after each epoch, writes its checkpoint
(``study.trials.checkpoints``), then logs the epoch to MLflow, then reports the epoch's metrics to Tune
(no Tune checkpoint: Ray's folders are a disposable cache). A trial that runs again (an interrupted
study, a lost worker) continues from its checkpoint and logs only what MLflow does not have, so
every epoch is recorded once.

The last epoch is reported only after everything is recorded (test BPC, memory timescales,
``model.pt``), because a scheduler may stop the trial at that report. That last report carries
``finished = True``: a trial without it was stopped early or interrupted.

A diverging trial (``DivergenceError``, which includes a model that did not learn) is recorded as
failed with its reason and raises, so it fails alone; a rerun of the study does not train it
again. A trial that failed for any other reason is retried when the study is resumed, up to
``MAX_ATTEMPTS`` attempts in all, its attempts counted on its run (``nlstm.attempts``).
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune

from nlstm.analysis import memory_timescales, memory_traces
from nlstm.checkpoint import CheckpointError
from nlstm.data import Corpus
from nlstm.data.synthetic import SyntheticConfig
from nlstm.model import CharLM, ModelConfig
from nlstm.probes import closer_bpc, no_memory_bound
from nlstm.trainer import DivergenceError, EpochResult, TrainConfig, Trainer, TrainResult, seed_everything
from study.record.layout import (
    ARCH_TAG,
    CANDIDATE_TAG,
    CODE_VERSION_TAG,
    CONFIG_HASH_TAG,
    CPUS_TAG,
    DEPTH_TAG,
    DEVICE_TAG,
    FAIL_REASON_TAG,
    FAMILY_TAG,
    GIT_COMMIT_TAG,
    KIND_TAG,
    PARAMS_JSON_TAG,
    PARENT_RUN_TAG,
    PHASE_TAG,
    RECORD_VERSION,
    RECORD_VERSION_TAG,
    SEED_TAG,
    STUDY_TAG,
    THREADS_TAG,
)
from study.record.lease import LeaseFence
from study.spec.configs import TrialConfig, resolve
from study.spec.schema import StudySpec
from study.trials.checkpoints import TRAINER_FILE, CheckpointStore, save_model_file
from study.trials.corpus import node_corpus
from study.trials.mlflow_run import MAX_ATTEMPTS, TrialRun
from study.trials.placement import trial_device, where_am_i

MEMORY_STEPS = 1000  # held-out symbols read for the memory timescales and memories.npz


DISK_FULL = "no space left on the device"


def is_disk_full(error: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception's chain (sqlite says "database or disk is full")."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error) \
                or "database or disk is full" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def full_folder(error: BaseException, default: str) -> str:
    """The folder whose device is full, from the error's file name when it has one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if getattr(error, "filename", None):
            return str(Path(error.filename).parent)
        error = error.__cause__ or error.__context__
    return default


class TrialGaveUp(RuntimeError):
    """A trial failed ``MAX_ATTEMPTS`` times for reasons other than divergence; it is not retried again."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a study shares (passed once with ``tune.with_parameters``)."""

    spec: StudySpec
    tracking_uri: str
    experiment_id: str
    checkpoints: CheckpointStore
    lease_owner: str  # the driver's lease (study.record.lease): a trial of a driver that lost it writes nothing more
    code_version: str = ""
    git_commit: str | None = None
    data_dir: str | None = None
    threads: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class TrialSpec:
    """One trial, as the searcher put it in the Tune config."""

    key: str
    phase: str
    family: str
    params: dict[str, Any]
    seed: int
    parent_run_id: str  # the MLflow run it is recorded under (the study run, or its config run)
    data_fingerprint: str | None = None  # the driver's corpus for this trial: every node must train on the same
    tuning_group: str = ""  # search trials: the search family whose budget (Optuna study, scheduler) it is of

    def as_config(self) -> dict[str, Any]:
        return {"trial_key": self.key, "phase": self.phase, "family": self.family, "params": self.params,
                "seed": self.seed, "parent_run_id": self.parent_run_id, "data_fingerprint": self.data_fingerprint,
                "tuning_group": self.tuning_group}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrialSpec:
        return cls(config["trial_key"], config["phase"], config["family"], dict(config["params"]),
                   int(config["seed"]), config["parent_run_id"], config.get("data_fingerprint"),
                   config.get("tuning_group", ""))


def trial_tags(spec: StudySpec, trial: TrialSpec, cfg: TrialConfig, context: TrialContext) -> dict[str, str]:
    tags = {PARENT_RUN_TAG: trial.parent_run_id, KIND_TAG: "trial", PHASE_TAG: trial.phase, STUDY_TAG: spec.name,
            ARCH_TAG: cfg.arch, DEPTH_TAG: str(cfg.depth), FAMILY_TAG: cfg.family,
            CANDIDATE_TAG: cfg.candidate_activation, CONFIG_HASH_TAG: cfg.config_hash, SEED_TAG: str(trial.seed),
            PARAMS_JSON_TAG: json.dumps(trial.params, sort_keys=True), RECORD_VERSION_TAG: str(RECORD_VERSION),
            CODE_VERSION_TAG: context.code_version}
    if context.git_commit:
        tags[GIT_COMMIT_TAG] = context.git_commit
    return tags


class _Reporter:
    """Trainer callback, per epoch: the checkpoint, then MLflow, then Tune (the final report comes last)."""

    def __init__(self, run: TrialRun, trial: TrialSpec, cfg: TrialConfig, meta: dict[str, Any],
                 checkpoints: CheckpointStore) -> None:
        self.run, self.trial, self.cfg, self.meta, self.checkpoints = run, trial, cfg, meta, checkpoints
        self.last: EpochResult | None = None
        self.resumed_at_s = 0.0  # training time the checkpoint held: this attempt trained the rest

    def metrics(self, trainer: Trainer, r: EpochResult | None, finished: bool) -> dict[str, Any]:
        s = self.cfg.solution
        out: dict[str, Any] = {"trial_key": self.trial.key, "mlflow_run_id": self.run.run_id, "arch": self.cfg.arch,
                               "family": self.cfg.family, "phase": self.trial.phase, "num_params": s.params,
                               "finished": finished, "best_valid_bpc": trainer.best_valid_bpc,
                               "train_time_this_run_s": trainer.train_time_s - self.resumed_at_s}
        if r is not None:
            out |= {"epoch": r.epoch, "valid_bpc": r.valid_bpc, "train_bpc": r.train_bpc, "lr": r.lr,
                    "tokens_per_s": r.tokens_per_s, "train_time_s": r.train_time_s, "wall_time_s": r.wall_time_s}
        else:
            out |= {"epoch": 0, "valid_bpc": math.inf}
        return out

    def log(self, r: EpochResult) -> None:
        self.run.log_epoch(r, extra={"load_avg_1m": os.getloadavg()[0]})

    def on_epoch_end(self, trainer: Trainer, r: EpochResult) -> None:
        self.run.fence()  # a trial whose driver lost the study overwrites nothing, its checkpoint included
        self.checkpoints.save(self.trial.key, trainer, self.meta)  # first: a logged epoch always has its checkpoint
        self.log(r)
        self.last = r
        if is_last_epoch(trainer, r):
            return  # reported by finish(), once everything is recorded
        tune.report(self.metrics(trainer, r, finished=False))

    def report_final(self, trainer: Trainer) -> None:
        tune.report(self.metrics(trainer, self.last, finished=True))


def is_last_epoch(trainer: Trainer, r: EpochResult) -> bool:
    """True when ``Trainer.fit`` will stop after this epoch (epochs, patience or time budget)."""
    c = trainer.cfg
    return (r.epoch >= c.epochs
            or (c.patience is not None and trainer.epochs_without_improvement >= c.patience)
            or (c.time_budget_s is not None and trainer.train_time_s >= c.time_budget_s))


def record_memories(run: TrialRun, model: CharLM, corpus: Corpus, out_dir: Path) -> dict[str, float]:
    """Memory timescales on held-out text (the test split's start) -> metrics + memories.npz."""
    tokens = corpus.test[:MEMORY_STEPS]
    if len(tokens) < 8:
        return {}
    traces = memory_traces(model, tokens)
    stats = memory_timescales(traces)
    arrays = {f"level_{k}": t.astype(np.float32) for k, t in enumerate(traces)}
    arrays["text"] = np.array(corpus.vocab.decode(tokens))
    np.savez_compressed(out_dir / "memories.npz", **arrays)
    run.log_artifact(out_dir / "memories.npz")
    return stats


def finish(run: TrialRun, reporter: _Reporter, trainer: Trainer, result: TrainResult, corpus: Corpus,
           synthetic: SyntheticConfig | None = None) -> None:
    cfg, trial = reporter.cfg, reporter.trial
    final = {"best_valid_bpc": result.best_valid_bpc, "test_bpc": result.test_bpc, "num_params": cfg.solution.params,
             "tokens_per_s": result.tokens_per_s, "train_time_s": result.train_time_s,
             "epochs_run": len(result.history)}
    loads = [m.value for m in run.client.get_metric_history(run.run_id, "load_avg_1m")]
    if loads:
        final["load_avg_max"] = max(loads)
    if synthetic is not None:  # the planted long-range dependency, scored alone (nlstm.probes), best weights
        final["closer_bpc"] = closer_bpc(trainer.model, corpus.test, corpus.vocab, synthetic.brackets)
        final["closer_bound_bits"] = no_memory_bound(synthetic.brackets)  # what forgetting the opener costs
        run.client.log_param(run.run_id, "dependency_length", synthetic.dependency_length)
    with tempfile.TemporaryDirectory() as d:
        if trial.phase in ("evaluate", "ablation"):  # the trainer has loaded the best weights
            final |= record_memories(run, trainer.model, corpus, Path(d))
            run.log_artifact(save_model_file(Path(d) / "model.pt", trainer.model, reporter.meta["model_config"],
                                             corpus.vocab, trial.key))
    if result.history:  # already logged per epoch, cumulative: the last epoch's value is the final one
        final.pop("tokens_per_s")
        final.pop("train_time_s")
    run.log_metrics({k: v for k, v in final.items() if v is not None and math.isfinite(v)})
    run.set_status("completed", stop_reason=result.stop_reason)


def _report_recorded(run: TrialRun, trial: TrialSpec, cfg: TrialConfig) -> None:
    """A trial whose run completed before (a driver stopped between its end and the searcher hearing of
    it): report what the record holds, do not train again."""
    m = run.final_metrics()
    tune.report({"trial_key": trial.key, "mlflow_run_id": run.run_id, "arch": cfg.arch, "family": cfg.family,
                 "phase": trial.phase, "num_params": cfg.solution.params, "finished": True,
                 "epoch": int(m.get("epochs_run", 0)), "best_valid_bpc": m.get("best_valid_bpc", math.inf),
                 "valid_bpc": m.get("valid_bpc", math.inf)})


def _check_attempts(run: TrialRun) -> None:
    """A failed run is trained again only if its failure may be transient, at most MAX_ATTEMPTS times."""
    reason = run.tags.get(FAIL_REASON_TAG, "unknown error")
    if reason.startswith("diverged"):
        raise DivergenceError(reason.removeprefix("diverged: "))  # deterministic: it would diverge again
    if run.attempts >= MAX_ATTEMPTS:
        if not reason.startswith("gave up"):
            reason = f"gave up after {run.attempts} attempts; the last failed with {reason}"
            run.set_status("failed", reason, stop_reason="failed")
        raise TrialGaveUp(reason)
    run.retry()  # a transient failure (locked store, lost worker, out of memory) gets another attempt


def _resume(build: Any, reporter: _Reporter, run: TrialRun, context: TrialContext) -> tuple[Trainer, TrialRun]:
    """Continue from the trial's checkpoint, if it has one, and log the epochs it holds that MLflow lacks.

    A checkpoint that cannot be read (damaged, missing, or of another record) is not trusted: the run that
    logged epochs from it is set aside as superseded and the trial starts over in a fresh run, so no run mixes two
    trainings."""
    trial, trainer = reporter.trial, build()
    with tempfile.TemporaryDirectory() as d:
        try:
            meta = context.checkpoints.fetch(trial.key, Path(d))
            foreign = meta is not None and (meta.get("key"), meta.get("experiment_id")) != (trial.key,
                                                                                           context.experiment_id)
            if foreign:
                raise CheckpointError(f"checkpoint {context.checkpoints.location}/{trial.key} belongs to another "
                                      f"record ({meta.get('key')}, experiment {meta.get('experiment_id')})")
            if meta is not None:
                trainer.load_checkpoint(Path(d) / TRAINER_FILE)
            elif run.logged_epochs:  # each epoch's checkpoint is written before it is logged: this one was lost
                raise CheckpointError(f"checkpoint {context.checkpoints.location}/{trial.key} is missing, but "
                                      f"{run.logged_epochs} epoch(s) were logged")
        except CheckpointError as e:
            print(f"{trial.key}: {e}; starting it over", flush=True)
            trainer = build()  # a fresh start: the one above may hold part of the checkpoint
            if run.logged_epochs:
                run = run.supersede(f"its checkpoint could not be used ({e})")
                reporter.run = run
            return trainer, run
    for r in trainer.history:  # saved before it was logged: a driver stopped between the two
        run.log_epoch(r)
    if trainer.history:
        reporter.last = trainer.history[-1]
    reporter.resumed_at_s = trainer.train_time_s
    return trainer, run


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable (wrapped with ``tune.with_parameters(run_trial, context=...)``)."""
    torch.set_num_threads(max(1, context.threads))
    spec, trial = context.spec, TrialSpec.from_config(config)
    where = where_am_i()
    device = trial_device(context.device, where)
    unsolved = resolve(spec, trial.phase, trial.params)
    corpus = node_corpus(spec, context.data_dir, trial.data_fingerprint, where, unsolved.data)
    cfg = unsolved.solve(len(corpus.vocab))
    fence = LeaseFence(context.tracking_uri, context.experiment_id, context.lease_owner)
    run = TrialRun.attach(context.tracking_uri, context.experiment_id, trial.key,
                          trial_tags(spec, trial, cfg, context),
                          cfg.mlflow_params(trial.seed) | {"data_fingerprint": corpus.fingerprint}, fence=fence)
    if run.status == "completed":
        _report_recorded(run, trial, cfg)
        return
    if run.status == "failed":
        _check_attempts(run)

    # where this attempt trains (a trial that finished earlier keeps the tags of where it did)
    run.set_tags(where | {DEVICE_TAG: _device_name(device), THREADS_TAG: str(torch.get_num_threads()),
                          CPUS_TAG: str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                        else os.cpu_count() or 1)})
    model_config = cfg.model_config(len(corpus.vocab))
    meta = {"key": trial.key, "experiment_id": context.experiment_id, "model_config": model_config,
            "vocab": corpus.vocab.to_json()}
    reporter = _Reporter(run, trial, cfg, meta, context.checkpoints)

    def build() -> Trainer:
        seed_everything(trial.seed)
        model = CharLM(ModelConfig(**model_config))
        return Trainer(model, corpus, TrainConfig(**cfg.train, seed=trial.seed, device=device), callbacks=[reporter])

    try:
        trainer, run = _resume(build, reporter, run, context)
        result = trainer.fit()
        synthetic = SyntheticConfig(**spec.data.options | cfg.data) if spec.data.corpus == "synthetic" else None
        finish(run, reporter, trainer, result, corpus, synthetic)
    except DivergenceError as e:
        run.set_status("failed", f"diverged: {e}", stop_reason="diverged")
        raise
    except LeaseFence.Lost:
        raise
    except Exception as e:
        if is_disk_full(e):  # the machine's problem, not the trial's: no attempt is spent on it
            run.set_status("interrupted", f"{DISK_FULL} of {full_folder(e, context.checkpoints.location)}",
                           stop_reason="interrupted")
            raise
        run.set_status("failed", f"{type(e).__name__}: {e}", stop_reason="failed")
        raise
    reporter.report_final(trainer)


def _device_name(device: str) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else device
