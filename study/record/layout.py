"""The names of a study's MLflow layout (docs/mlflow-layout.md) in one place: ``study`` writes
them, ``dashboards`` reads them. Plain constants and string functions only: importing this module
imports neither Ray, MLflow nor torch, so the report reads a store without them.

Values of the tags: ``nlstm.kind`` is ``study | config | trial``; ``nlstm.status`` is ``running``,
then ``completed | pruned | failed`` (``interrupted`` when the driver was stopped); ``nlstm.phase``
is one of :data:`PHASES`; ``nlstm.arch`` one of :data:`ARCHS`.
"""

from __future__ import annotations

from typing import Any

PHASES = ("search", "evaluate", "ablation")
ARCHS = ("nlstm", "stacked", "single")

# ------------------------------------------------------------------ tags (ours all start with TAG)
TAG = "nlstm."
KIND_TAG = "nlstm.kind"
STUDY_TAG = "nlstm.study"  # on the experiment and on every run
STUDY_HASH_TAG = "nlstm.study_hash"  # parent run: the validated spec's hash
PHASE_TAG = "nlstm.phase"
CONFIG_HASH_TAG = "nlstm.config_hash"  # the configuration without the seed
ARCH_TAG = "nlstm.arch"
DEPTH_TAG = "nlstm.depth"
FAMILY_TAG = "nlstm.family"  # arch and depth: nlstm-d2, stacked-d2, single-d1, ...
SEED_TAG = "nlstm.seed"
TRIAL_ID_TAG = "nlstm.trial_id"  # a trial run's identity (its name is only a label)
STATUS_TAG = "nlstm.status"
FAIL_REASON_TAG = "nlstm.fail_reason"
ATTEMPTS_TAG = "nlstm.attempts"
SOURCE_TRIAL_TAG = "nlstm.source_trial"  # evaluate config runs: the search trial they re-run
TRIAL_SLOTS_TAG = "nlstm.trial_slots"  # parent run: trials at a time in the last driver run
LEASE_TAG = "nlstm.lease"  # experiment: the driver that holds the study (study.record.lease)
# Where a trial's latest attempt trained.
HOSTNAME_TAG = "nlstm.hostname"
NODE_ID_TAG = "nlstm.node_id"
NODE_IP_TAG = "nlstm.node_ip"
GPU_IDS_TAG = "nlstm.gpu_ids"
CUDA_VISIBLE_DEVICES_TAG = "nlstm.cuda_visible_devices"
DEVICE_TAG = "nlstm.device"
THREADS_TAG = "nlstm.threads"
FACTOR_TAG_PREFIX = "nlstm.factor."  # ablation config runs: nlstm.factor.<name> = <value>
CANDIDATE_TAG = "nlstm.candidate_activation"  # trial and config runs: the outer candidate, identity | tanh
# Why a trial run stopped training (trial runs): one of STOP_REASONS. A claim that a model "ends worse"
# rests only on runs that stopped at their plateau; the others show how fast it learns.
STOP_REASON_TAG = "nlstm.stop_reason"
STOP_REASONS = ("plateau", "max_epochs", "time_budget", "pruned", "diverged", "failed", "interrupted")
# The code that trained a run (trial runs, the latest attempt; the parent run: the latest driver).
CODE_VERSION_TAG = "nlstm.code_version"  # the package version, +g<commit> from a git checkout (+dirty)
RECORD_VERSION_TAG = "nlstm.record_version"  # parent and trial runs: RECORD_VERSION of the code that wrote them
PARAMS_JSON_TAG = "nlstm.params"  # trial runs: the sampled/ablated values, JSON (typed, unlike MLflow params)
SELECTED_TAG = "nlstm.selected"  # evaluate config runs: "false" once an extended search chose another config
SEARCH_BUDGET_TAG = "nlstm.search_trials_per_family"  # parent run: the tuning budget of every search family
SEARCH_TRIALS_TAG = "nlstm.search_trials"  # parent run: search trials in all (families x their budget)
SEARCH_FIDELITY_TAG = "nlstm.search_fidelity"  # parent run: how long each search trial trains, and the scheduler
OPTUNA_STORAGE_TAG = "nlstm.optuna_storage"  # parent run: where the search's Optuna studies are (password masked)
CHECKPOINTS_TAG = "nlstm.checkpoints"  # parent run: where the trials' checkpoints are (study.trials.checkpoints)
BEST_CONFIG_TAG = "nlstm.best_config"  # parent run: the run name of the configuration its summary metrics are of
CPUS_TAG = "nlstm.cpus"  # trial runs: the logical CPUs of the node the latest attempt ran on

#: What a configuration means (model, trainer, data, selection semantics) as the record stores it. Bump it
#: with any change that alters what a recorded configuration computes or how its runs are named; a study
#: recorded under another record version is not resumed or extended by this code (docs/study.md).
RECORD_VERSION = 2

#: One chance rule everywhere (the trainer's ``learn_margin_bits`` default, the driver's selection, the
#: report): a run learned only if its BPC is this far below the training split's unigram entropy.
CHANCE_MARGIN_BITS = 0.1


def below_chance(bpc: float | None, unigram_entropy_bits: float | None) -> bool:
    """Whether a BPC counts as learned: finite and ``CHANCE_MARGIN_BITS`` below the unigram entropy."""
    if bpc is None or unigram_entropy_bits is None:
        return False
    try:
        bpc, bar = float(bpc), float(unigram_entropy_bits)
    except (TypeError, ValueError):
        return False
    return bpc == bpc and bar == bar and bpc < bar - CHANCE_MARGIN_BITS


def phase_tag(phase: str) -> str:
    """The parent run's tag saying how a phase ended: ``done``, or ``failed: <why>``."""
    return f"nlstm.phase.{phase}"


def factor_tag(name: str) -> str:
    return FACTOR_TAG_PREFIX + name


def factors_of(tags: dict[str, str]) -> dict[str, str]:
    """A config run's ablation factors ``{name: value}`` from its tags (the inverse of :func:`factor_tag`)."""
    return {key.removeprefix(FACTOR_TAG_PREFIX): value for key, value in tags.items()
            if key.startswith(FACTOR_TAG_PREFIX)}


# MLflow's own tags that a study sets.
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# MLflow 3's UI opens an experiment on its GenAI overview unless it is marked as model training.
EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT = "mlflow.experimentKind", "custom_model_development"
# A pruned trial ended as its scheduler meant it to: FINISHED, so MLflow's UI does not show it as a failure.
MLFLOW_STATUS = {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}

# ------------------------------------------------------------------ metrics
# cpu_share: process CPU seconds spent in training steps / (training seconds x torch threads), cumulative: near 1
# when the trial had its CPUs, well below when the machine was shared beyond its cores. load_avg_1m: the node's
# 1-minute load average at the epoch's end.
EPOCH_METRICS = ("train_bpc", "valid_bpc", "lr", "tokens_per_s", "train_time_s", "wall_time_s", "tokens_seen",
                 "cpu_share", "load_avg_1m")
FINAL_METRICS = ("best_valid_bpc", "test_bpc", "num_params", "tokens_per_s", "train_time_s", "epochs_run",
                 "load_avg_max")
# Summary metrics of a config run over its seeds' completed trials (and of the parent run: its best
# configuration's), so MLflow's collapsed runs table and chart view show them.
SUMMARY_METRICS = ("valid_bpc_mean", "valid_bpc_sd", "test_bpc_mean", "test_bpc_sd", "n_seeds")
STUDY_EFFICIENCY_METRIC = "study_efficiency"  # parent run: trial training time / (wall time x trial slots)


# ------------------------------------------------------------------ trial keys (= run names)
# A trial run's identity (tag nlstm.trial_id) is also its run name, the name the console, Optuna's user
# attributes and the report use: the family and seed come first, so a narrow column still tells runs apart.
def search_key(family: str, number: int) -> str:
    """``nlstm-d2-search-003``: search trial ``number`` of ``family`` (the Optuna trial number of the family's
    study, or of the one study of a search without families)."""
    return f"{family}-search-{number:03d}"


def planned_key(phase: str, family: str, seed: int, config_hash: str) -> str:
    """``nlstm-d2-s1-evaluate-3fa2c1d0``: an evaluate or ablation trial (the config hash's start tells two
    configurations of one family apart)."""
    return f"{family}-s{seed}-{phase}-{config_hash[:8]}"


def trial_key_of(config: dict[str, Any]) -> str | None:
    """A trial's key from its Tune config (``study.search.searcher`` puts it there)."""
    return config.get("trial_key")
