"""The study file's schema: pydantic v2 models of its sections, with their defaults and ranges.

Unknown keys are rejected everywhere (``extra="forbid"``); ``study.spec.load`` reads a file into these
models and ``study.spec.checks`` adds what a schema alone cannot say.

The file has these sections (docs/study.md has an annotated example)::

    name, description
    data       corpus, options (to load_corpus), max_train_tokens, max_eval_tokens
    model      ModelConfig defaults: arch, depth, embedding_dim, dropout, candidate_activation, ...
    train      TrainConfig defaults: epochs, batch_size, bptt, optimizer, lr, clip, ...
    budget     the parameter budget: a number, or a space entry (then it is searched)
    budget_tolerance  how far an architecture's parameter count may be from its budget (0.02)
    search     space, sampler, scheduler, num_samples, max_concurrent, metric, seed, train overrides
    evaluate   top_k (per arch|family|none), seeds, train overrides (the full budget)
    ablation   base (search|defaults), params, factors (a grid), seeds, train overrides
    resources  cpus_per_trial, gpus_per_trial
    smoke      how --smoke shrinks the study

A value in a phase's ``train`` overrides the top-level ``train``; a sampled or ablated value
overrides both.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from study.record.layout import PHASES
from study.spec.errors import describe_value, did_you_mean

# Names a search space, an ablation factor or ablation.params may set: the model's and the
# trainer's options under their YAML names, plus `layers` (the depth of a stacked LSTM).
MODEL_PARAMS = ("arch", "depth", "layers", "embedding_dim", "dropout", "candidate_activation", "forget_bias", "impl")
# Every budget of a study is a parameter count in [MIN_BUDGET, MAX_BUDGET]. The cap is a hard one,
# checked without knowing the machine: a billion parameters need 16 GB for weights, gradients and
# Adam's state alone (study.spec.plan.check_budgets also checks the whole trial against this machine).
MIN_BUDGET = 100
MAX_BUDGET = 1_000_000_000


def _finite(value: Any) -> Any:
    """Checked before the union is tried, so that ``.nan`` says so (not 'expected true or false')."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("spec", "expected a finite number, got {value}", {"value": describe_value(value)})
    return value


# A value in a space entry, a condition or the ablation: a YAML scalar (numbers finite).
Scalar = Annotated[None | bool | int | float | str, BeforeValidator(_finite)]


class Section(BaseModel):
    """Base of every section: unknown keys are an error that lists the known ones. Types are
    strict (``true`` is not an integer, ``2.0`` is not an integer, ``"3"`` is not a number; an
    integer is a valid float) and every number is finite (``.inf`` and ``.nan`` are refused)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            for key in data:
                if key not in cls.model_fields:
                    raise PydanticCustomError(
                        "unknown_key", "unknown key; expected one of {known}{hint}",
                        {"key": str(key), "known": ", ".join(known), "hint": did_you_mean(str(key), known)},
                    )
        return data


# ------------------------------------------------------------------ model and training defaults
class ModelDefaults(Section):
    """``nlstm.model.ModelConfig`` without vocab_size and width (those come from the data and the budget)."""

    arch: Literal["nlstm", "stacked", "single"] = "nlstm"
    depth: int = Field(2, ge=1, le=8)
    embedding_dim: int | None = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    candidate_activation: Literal["identity", "tanh"] = "identity"
    forget_bias: float = Field(1.0, ge=-10.0, le=10.0)
    impl: Literal["fused", "reference"] = "fused"


class TrainDefaults(Section):
    """``nlstm.trainer.TrainConfig`` without seed and device (phases choose those)."""

    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(32, ge=1)
    bptt: int = Field(100, ge=1)
    eval_batch_size: int = Field(16, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(2e-3, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    clip: float = Field(1.0, ge=0.0)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    lr_decay: float = Field(0.5, gt=0.0, le=1.0)
    patience: int | None = Field(3, ge=1)
    min_delta: float = Field(1e-4, ge=0.0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    max_eval_tokens: int | None = Field(None, ge=2)
    time_budget_s: float | None = Field(None, gt=0.0)
    learn_check: bool = True  # fail a run that does not learn (nlstm.trainer.learning_failure)
    learn_margin_bits: float = Field(0.1, ge=0.0)
    learn_after_steps: int = Field(1000, ge=0)


TRAIN_PARAMS = tuple(TrainDefaults.model_fields)
PARAM_NAMES = (*MODEL_PARAMS, *TRAIN_PARAMS)
# Corpus options an ablation may vary per trial (the synthetic corpus only): the long-range probe's
# factor. Each value is a different corpus, generated by every trial and checked against the driver's.
DATA_PARAMS = ("dependency_length",)


# ------------------------------------------------------------------ search space entries
class _Entry(Section):
    when: dict[str, Scalar | list[Scalar]] | None = None  # sample only if earlier parameters have these values


class FloatEntry(_Entry):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _range(self) -> FloatEntry:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise PydanticCustomError("spec", "expected finite low < high, got low={low}, high={high}",
                                      {"low": self.low, "high": self.high})
        if self.log and self.low <= 0:
            raise PydanticCustomError("spec", "expected low > 0 with log: true, got low={low}", {"low": self.low})
        if self.log and self.step is not None:
            raise PydanticCustomError("spec", "expected either log: true or a step, not both", {})
        return self


class IntEntry(_Entry):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntEntry:
        if self.low > self.high:
            raise PydanticCustomError("spec", "expected low <= high, got low={low}, high={high}",
                                      {"low": self.low, "high": self.high})
        if self.log and (self.low < 1 or self.step != 1):
            raise PydanticCustomError("spec", "expected low >= 1 and step 1 with log: true", {})
        return self


class CategoricalEntry(_Entry):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(min_length=1)
    balanced: bool = False  # not sampled: trial n takes choice n mod k, so every choice gets its share

    @field_validator("choices")
    @classmethod
    def _distinct(cls, choices: list[Scalar]) -> list[Scalar]:
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise PydanticCustomError("spec", "expected distinct choices, got {choices}", {"choices": choices})
        return choices


class FixedEntry(_Entry):
    type: Literal["fixed"]
    value: Scalar


SpaceEntry = Annotated[FloatEntry | IntEntry | CategoricalEntry | FixedEntry, Field(discriminator="type")]


def _shorthand(value: Any) -> Any:
    """``lr: 0.01`` means a fixed value and ``arch: [nlstm, stacked]`` a categorical choice."""
    if isinstance(value, list):
        return {"type": "categorical", "choices": value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"type": "fixed", "value": value}
    return value


def entry_values(entry: FloatEntry | IntEntry | CategoricalEntry | FixedEntry) -> list[Any]:
    """The values an entry can take that must each be valid (all choices, or the range ends)."""
    if isinstance(entry, CategoricalEntry):
        return list(entry.choices)
    if isinstance(entry, FixedEntry):
        return [entry.value]
    return [entry.low, entry.high]


# ------------------------------------------------------------------ sections
def _distinct_seeds(seeds: list[int]) -> list[int]:
    if len(set(seeds)) != len(seeds):
        raise PydanticCustomError("spec", "expected distinct seeds, got {seeds}", {"seeds": seeds})
    return seeds


Seeds = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct_seeds)]

class DataSpec(Section):
    corpus: str
    options: dict[str, Any] = {}
    max_train_tokens: int | None = Field(None, ge=100)  # use a prefix of the training stream
    max_eval_tokens: int | None = Field(None, ge=10)  # ... and of valid and test


class SamplerSpec(Section):
    type: Literal["tpe", "random", "cmaes", "qmc", "grid"] = "tpe"
    seed: int = 0
    n_startup_trials: int | None = Field(None, ge=0)  # tpe, cmaes: random trials before modelling
    multivariate: bool = False  # tpe
    qmc_type: Literal["sobol", "halton"] = "sobol"  # qmc


class SchedulerSpec(Section):
    type: Literal["asha", "median", "none"] = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial gets before it may be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # asha
    min_samples_required: int = Field(3, ge=1)  # median


class SearchSpec(Section):
    # Families tuned alone, each with its own Optuna study, sampler and scheduler and the same budget of
    # `trials_per_family` trials (equal tuning effort per model, as Melis et al. 2018): each entry fixes
    # the model fields that make a family (arch, depth or layers, candidate_activation, ...).
    families: list[dict[str, Scalar]] | None = Field(None, min_length=1)
    trials_per_family: int | None = Field(None, ge=1)
    space: dict[str, SpaceEntry] = {}
    sampler: SamplerSpec = SamplerSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    num_samples: int | None = Field(None, ge=1)  # default 10 (grid: the grid's size)
    max_concurrent: int | None = Field(None, ge=1)  # default: as many as the CPUs/GPUs allow
    metric: Literal["valid_bpc"] = "valid_bpc"  # trials are ranked by their best valid_bpc
    seed: int = 0  # the training seed of every search trial (evaluation seeds must differ)
    train: TrainDefaults = TrainDefaults()  # overrides of the top-level train for this phase

    @field_validator("space", mode="before")
    @classmethod
    def _expand(cls, space: Any) -> Any:
        return {k: _shorthand(v) for k, v in space.items()} if isinstance(space, dict) else space


class EvaluateSpec(Section):
    top_k: int = Field(1, ge=1)  # re-run the k best search configurations ...
    per: Literal["none", "arch", "family"] = "none"  # ... overall, or k per arch / per family (arch+depth)
    seeds: Seeds  # fresh seeds, each configuration once per seed
    train: TrainDefaults = TrainDefaults()  # overrides: the full training budget


class AblationSpec(Section):
    base: Literal["defaults", "search"] = "defaults"  # start from the model/train defaults or the best search config
    params: dict[str, Scalar] = {}  # fixed values on top of the base
    factors: dict[str, list[Scalar]] = Field(min_length=1)  # the grid: every combination is a cell
    seeds: Seeds
    train: TrainDefaults = TrainDefaults()

    @field_validator("factors")
    @classmethod
    def _non_empty(cls, factors: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for name, values in factors.items():
            if not values:
                raise PydanticCustomError("spec", "expected a non-empty list of values for factor {name}",
                                          {"name": name})
        return factors


class ResourcesSpec(Section):
    cpus_per_trial: float = Field(1.0, gt=0.0)  # also the trial's torch threads
    gpus_per_trial: float = Field(0.0, ge=0.0)  # fractional GPUs share one device


class SmokeSpec(Section):
    """How ``--smoke`` shrinks the study: the same phases and grid, tiny data and epochs."""

    max_train_tokens: int = Field(20_000, ge=100)
    max_eval_tokens: int = Field(2_000, ge=10)
    epochs: int = Field(1, ge=1)
    max_steps_per_epoch: int | None = Field(10, ge=1)
    num_samples: int = Field(2, ge=1)
    top_k: int = Field(1, ge=1)
    seeds: int = Field(1, ge=1)  # keep the first n evaluation / ablation seeds
    budget: float | None = Field(None, ge=MIN_BUDGET, le=MAX_BUDGET)  # replace every budget by this one
    model: ModelDefaults = ModelDefaults()  # overrides of the model defaults
    train: TrainDefaults = TrainDefaults()  # overrides of every phase's training options


class StudySpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    description: str = ""
    data: DataSpec
    model: ModelDefaults = ModelDefaults()
    train: TrainDefaults = TrainDefaults()
    budget: SpaceEntry
    # Every architecture's parameter count must be within this fraction of each budget (the width
    # and embedding size are solved per architecture; budgets too small to match are refused).
    budget_tolerance: float = Field(0.02, gt=0.0, lt=1.0)
    search: SearchSpec | None = None
    evaluate: EvaluateSpec | None = None
    ablation: AblationSpec | None = None
    resources: ResourcesSpec = ResourcesSpec()
    smoke: SmokeSpec = SmokeSpec()

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_shorthand(cls, value: Any) -> Any:
        return _shorthand(value)

    @model_validator(mode="after")
    def _effective_phase_training(self) -> StudySpec:
        """Fill each phase's ``train`` with the top-level values it does not override."""
        for phase in (self.search, self.evaluate, self.ablation):
            if phase is not None:
                phase.train = merge_train(self.train, phase.train)
        return self

    @property
    def phases(self) -> list[str]:
        return [p for p in PHASES if getattr(self, p) is not None]

    def phase_train(self, phase: str) -> TrainDefaults:
        section = getattr(self, phase, None)
        return section.train if section is not None else self.train

    def study_hash(self) -> str:
        """Identity of what the study computes (not its description, resources or the tolerance
        the budgets were checked with: none of them changes a trial)."""
        data = self.model_dump(mode="json", exclude={"description", "resources", "budget_tolerance"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False)


def merge_train(base: TrainDefaults, override: TrainDefaults) -> TrainDefaults:
    merged = TrainDefaults.model_validate(base.model_dump() | override.model_dump(exclude_unset=True))
    merged.__pydantic_fields_set__ = set(base.model_fields_set) | set(override.model_fields_set)
    return merged
