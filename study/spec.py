"""The study file: a pydantic v2 schema, and ``load_spec(path)`` that validates it.

Every error is one line ``FILE: key.path: expected ...`` (``SpecError``): the CLI prints it and
exits 2 before anything is written. Unknown keys are rejected everywhere (``extra="forbid"``).

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

import difflib
import hashlib
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

PHASES = ("search", "evaluate", "ablation")
ARCHS = ("nlstm", "stacked", "single")
# Names a search space, an ablation factor or ablation.params may set: the model's and the
# trainer's options under their YAML names, plus `layers` (the depth of a stacked LSTM).
MODEL_PARAMS = ("arch", "depth", "layers", "embedding_dim", "dropout", "candidate_activation", "forget_bias", "impl")
NOT_SEARCHABLE_TRAIN = ("seed", "device")
# Every budget of a study is a parameter count in [MIN_BUDGET, MAX_BUDGET]. The cap is a hard one,
# checked without knowing the machine: a billion parameters need 16 GB for weights, gradients and
# Adam's state alone (study.plan.check_budgets also checks the whole trial against this machine).
MIN_BUDGET = 100
MAX_BUDGET = 1_000_000_000



def _finite(value: Any) -> Any:
    """Checked before the union is tried, so that ``.nan`` says so (not 'expected true or false')."""
    if isinstance(value, float) and not math.isfinite(value):
        raise PydanticCustomError("spec", "expected a finite number, got {value}", {"value": _describe(value)})
    return value


# A value in a space entry, a condition or the ablation: a YAML scalar (numbers finite).
Scalar = Annotated[None | bool | int | float | str, BeforeValidator(_finite)]


class SpecError(ValueError):
    """A study file that cannot be run: ``FILE: key.path: message`` (one line)."""

    def __init__(self, file: str | Path, path: str, message: str) -> None:
        self.file, self.path, self.message = str(file), path, message
        super().__init__(f"{self.file}: {path}: {message}" if path else f"{self.file}: {message}")


def _close(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


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
                        {"key": str(key), "known": ", ".join(known), "hint": _close(str(key), known)},
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
ENTRY_TYPES = ("float", "int", "categorical", "fixed")


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


# ------------------------------------------------------------------ YAML reading
# Aliases are allowed (`train: &full {epochs: 50}` ... `train: *full`), but a document is refused
# once expanded past these limits: nine aliases of nine aliases of ... ("billion laughs") are 342
# bytes that expand to 10^9 values, and PyYAML's composer and every later pass recurse, so deep
# nesting or an alias inside its own anchor would end in a RecursionError. A study file needs
# 7 levels, a few hundred values and a few kB.
MAX_YAML_DEPTH = 32
MAX_YAML_VALUES = 10_000
MAX_YAML_CHARS = 1_000_000


class _Refused(yaml.MarkedYAMLError):
    """A document the loader will not expand (too deep, too large, or recursive)."""

    def __init__(self, mark: yaml.Mark, problem: str) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` (no dot) as a float, as YAML 1.2 does, and refuses deep
    nesting and recursive aliases while composing (before anything recurses over them)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._open: list[str | None] = []  # the anchors of the nodes being composed, outermost first
        self._composed = 0  # nodes composed so far (an alias is not a new node)

    def fetch_flow_collection_start(self, token_class: type) -> None:
        # The scanner keeps a possible key per open bracket and rescans them all for each token,
        # so 50,000 `[` would take minutes before the composer saw the first level.
        if self.flow_level >= MAX_YAML_DEPTH:
            raise _Refused(self.get_mark(), f"expected at most {MAX_YAML_DEPTH} levels of nesting")
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _Refused(event.start_mark, f"expected no alias inside its own anchor (*{event.anchor} "
                               "is recursive)")
            return super().compose_node(parent, index)
        if len(self._open) >= MAX_YAML_DEPTH:
            raise _Refused(event.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting")
        self._composed += 1
        if self._composed > MAX_YAML_VALUES:
            raise _Refused(event.start_mark, f"expected at most {MAX_YAML_VALUES:,} values")
        self._open.append(event.anchor)
        try:
            return super().compose_node(parent, index)
        finally:
            self._open.pop()


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_VALUES values or MAX_YAML_DEPTH
    levels. Each distinct node is visited once (its expanded size and height are remembered), so
    this is linear in the file, whatever the aliases would expand to."""
    known: dict[int, tuple[int, int]] = {}  # id(node) -> (values, levels) once expanded

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        if id(node) not in known:
            if depth > MAX_YAML_DEPTH:
                raise _Refused(node.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting "
                               "once aliases are expanded")
            values, levels = 1, 1
            for child in _children(node):
                child_values, child_levels = measure(child, depth + 1)
                values, levels = values + child_values, max(levels, child_levels + 1)
                if values > MAX_YAML_VALUES:
                    raise _Refused(node.start_mark, f"expected at most {MAX_YAML_VALUES:,} values once aliases "
                                   "are expanded, got more (aliases of aliases?)")
            known[id(node)] = (values, levels)
        values, levels = known[id(node)]
        if depth + levels - 1 > MAX_YAML_DEPTH:
            raise _Refused(node.start_mark, f"expected at most {MAX_YAML_DEPTH} levels of nesting once aliases "
                           "are expanded")
        return values, levels

    measure(root, 1)


def _check_duplicates(node: yaml.Node, file: str, path: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                raise SpecError(file, path, f"line {line}: expected a plain name as a key, got a "
                                f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}")
            key = key_node.value
            sub = f"{path}.{key}" if path else str(key)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise SpecError(file, sub, f"duplicate key (line {line}); expected each key once")
            seen.add(key)
            _check_duplicates(value_node, file, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, file, f"{path}[{i}]")


def read_yaml(path: str | Path) -> Any:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(file, "", f"cannot read it ({e})") from None
    if len(text) > MAX_YAML_CHARS:  # PyYAML reads ~2 MB/s: bound the time before parsing
        raise SpecError(file, "", f"expected at most {MAX_YAML_CHARS:,} characters, got {len(text):,}")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        _check_duplicates(node, file)
        return loader.construct_document(node)
    except _Refused as e:
        mark = e.problem_mark
        raise SpecError(file, "", f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        raise SpecError(file, "", f"{where}: expected valid YAML ({e.problem})") from None
    except yaml.YAMLError as e:
        raise SpecError(file, "", f"expected valid YAML ({e})") from None
    finally:
        loader.dispose()


# ------------------------------------------------------------------ error messages
# Parts of a pydantic error location that name a union member, not a key of the file.
_UNION_TAGS = {*ENTRY_TYPES, "int", "float", "str", "bool", "none", "list[...]", "dict[str,...]"}


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or str(part).startswith(("function-", "constrained-", "lax-or-strict", "json-or")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _describe(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_WORDS = {"float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer",
               "int_type": "an integer", "int_from_float": "an integer", "bool_parsing": "true or false",
               "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
               "finite_number": "a finite number"}


def _message(err: dict[str, Any]) -> tuple[str, str]:
    """(key path, 'expected ...') for the first pydantic error."""
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    path = _format_loc(loc)
    if kind == "unknown_key":
        return (f"{path}.{ctx['key']}" if path else ctx["key"]), err["msg"]
    if kind == "missing":
        return path, "expected a value (required key is missing)"
    if kind == "union_tag_not_found":
        return path, (f"expected a mapping with type: one of {', '.join(ENTRY_TYPES)} "
                      "(or a number, or a list of choices)")
    if kind == "union_tag_invalid":
        return path, f"expected type one of {', '.join(ENTRY_TYPES)}, got {_describe(ctx.get('tag'))}"
    if kind == "spec":
        return path, err["msg"]
    got = f", got {_describe(err['input'])}" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    if kind in _TYPE_WORDS:
        return path, f"expected {_TYPE_WORDS[kind]}{got}"
    if kind == "too_short":
        return path, f"expected at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return path, f"expected a mapping of keys, got {_describe(err.get('input'))}"
    if kind == "string_pattern_mismatch":
        return path, f"expected letters, digits, '_', '-' or '.' (a name), got {_describe(err.get('input'))}"
    if not msg.startswith("expected"):
        msg = f"expected {msg}"
    return path, msg + got


# ------------------------------------------------------------------ semantic checks
def _check_param_value(name: str, value: Any) -> str | None:
    """None if ``value`` is valid for parameter ``name``, else 'expected ...'."""
    field = "depth" if name == "layers" else name
    model = ModelDefaults if field in ModelDefaults.model_fields else TrainDefaults
    try:
        model.model_validate({field: value})
    except ValidationError as e:
        return _message(e.errors()[0])[1]
    return None


def _check_budget_value(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < MIN_BUDGET:
        return f"expected a parameter count >= {MIN_BUDGET}, got {_describe(value)}"
    if value > MAX_BUDGET:
        return (f"expected a parameter count <= {MAX_BUDGET:,} (larger models do not fit in memory), "
                f"got {_describe(value)}")
    return None


def _check_data_value(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {_describe(value)}"
    from nlstm.data import SyntheticConfig  # torch import: only once the file parsed

    try:
        SyntheticConfig(**{name: value})
    except ValueError as e:
        return f"expected a valid {name} ({e})"
    return None


def _check_value(name: str, value: Any) -> str | None:
    if name == "budget":
        return _check_budget_value(value)
    return _check_data_value(name, value) if name in DATA_PARAMS else _check_param_value(name, value)


_NOT_NUMERIC = {"arch", "candidate_activation", "impl", "optimizer", "lr_schedule"}
_INTEGER = {"depth", "layers", "embedding_dim", "epochs", "batch_size", "bptt", "eval_batch_size", "patience",
            "max_steps_per_epoch", "max_eval_tokens"}


def _check_entry(file: str, path: str, name: str, entry: Any) -> None:
    if isinstance(entry, (FloatEntry, IntEntry)) and name in _NOT_NUMERIC:
        raise SpecError(file, f"{path}.type", f"expected categorical or fixed for {name}, got {entry.type}")
    if isinstance(entry, FloatEntry) and name in _INTEGER:
        raise SpecError(file, f"{path}.type", f"expected int, categorical or fixed for {name} (an integer), got float")
    for i, value in enumerate(entry_values(entry)):
        problem = _check_value(name, value)
        if problem:
            where = {FloatEntry: ("low", "high"), IntEntry: ("low", "high")}.get(type(entry))
            # a fixed value is usually written bare (`dropout: 0.1`): name the entry itself
            sub = f"{path}.{where[i]}" if where else (f"{path}.choices[{i}]" if isinstance(entry, CategoricalEntry)
                                                       else path)
            raise SpecError(file, sub, problem)


def _check_space(file: str, spec: StudySpec) -> None:
    assert spec.search is not None
    defined: dict[str, Any] = {}
    if not isinstance(spec.budget, FixedEntry):
        defined["budget"] = spec.budget
    for name, entry in spec.search.space.items():
        path = f"search.space.{name}"
        if name == "budget":
            raise SpecError(file, path,
                            "expected the budget at the top level (`budget:` takes a number or a space entry)")
        if name not in PARAM_NAMES:
            raise SpecError(file, path, f"unknown parameter; expected one of {', '.join(PARAM_NAMES)}"
                            f"{_close(name, list(PARAM_NAMES))}")
        _check_entry(file, path, name, entry)
        for ref, wanted in (entry.when or {}).items():
            if ref not in defined:
                earlier = ", ".join(defined) or "none"
                raise SpecError(file, f"{path}.when.{ref}",
                                f"expected a parameter defined earlier in search.space ({earlier})")
            possible = entry_values(defined[ref]) if isinstance(defined[ref], (CategoricalEntry, FixedEntry)) else None
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if possible is not None and value not in possible:
                    raise SpecError(file, f"{path}.when.{ref}",
                                    f"expected one of the values {ref} can take ({', '.join(map(str, possible))}), "
                                    f"got {_describe(value)}")
        if isinstance(entry, CategoricalEntry) and entry.balanced and entry.when:
            raise SpecError(file, f"{path}.when", "expected no condition on a balanced parameter")
        if name == "layers" and not entry.when:
            raise SpecError(file, f"{path}.when",
                            "expected a condition such as {arch: stacked} (layers is the depth of a stacked LSTM)")
        defined[name] = entry
    if spec.search.sampler.type == "grid":
        for name, entry in [("budget", spec.budget), *spec.search.space.items()]:
            path = "budget" if name == "budget" else f"search.space.{name}"
            if entry.when:
                raise SpecError(file, f"{path}.when", "expected no conditions with the grid sampler")
            if isinstance(entry, FloatEntry) and entry.step is None:
                raise SpecError(file, path, "expected categorical, int or a float with a step for the grid sampler")


def _check_ablation(file: str, spec: StudySpec) -> None:
    ab = spec.ablation
    assert ab is not None
    allowed = [*PARAM_NAMES, "budget", *DATA_PARAMS]
    for section, items in (("params", {k: [v] for k, v in ab.params.items()}), ("factors", ab.factors)):
        for name, values in items.items():
            path = f"ablation.{section}.{name}"
            if name not in allowed:
                raise SpecError(file, path, f"unknown parameter; expected one of {', '.join(allowed)}"
                                f"{_close(name, allowed)}")
            if name in DATA_PARAMS and spec.data.corpus.lower() != "synthetic":
                raise SpecError(file, path, f"{name} is an option of the synthetic corpus; this study uses "
                                f"{spec.data.corpus}")
            for i, value in enumerate(values):
                problem = _check_value(name, value)
                if problem:
                    raise SpecError(file, f"{path}[{i}]" if section == "factors" else path, problem)
    if ab.base == "search" and spec.search is None:
        raise SpecError(file, "ablation.base", "expected `defaults` when the study has no search section")
    searched = not isinstance(spec.budget, FixedEntry)
    if ab.base == "defaults" and searched and "budget" not in ab.params and "budget" not in ab.factors:
        raise SpecError(file, "ablation", "expected a budget in ablation.params or ablation.factors (the top-level "
                        "budget is searched, and base: defaults takes no value from the search)")


class _SplitOptions(Section):
    split: list[float] = Field([0.9, 0.05, 0.05], min_length=3, max_length=3)  # train, valid, test fractions


class _PoetryOptions(Section):
    eval_set: Literal["5", "all"] = "5"


def _corpus_options(corpus: str) -> type[Section]:
    """The options ``load_corpus`` takes for this corpus, as a strict schema (types only: their
    ranges are the corpus's own checks)."""
    if corpus == "synthetic":
        from nlstm.data import SyntheticConfig

        hints = get_type_hints(SyntheticConfig)
        return create_model("SyntheticOptions", __base__=Section,
                            **{f.name: (hints[f.name], f.default) for f in fields(SyntheticConfig)})
    if corpus == "chinese-poetry":
        return _PoetryOptions
    if corpus == "tinyshakespeare" or corpus.startswith("text:"):
        return _SplitOptions
    return Section


def _check_data(file: str, spec: StudySpec) -> None:
    from nlstm.data import CORPUS_NAMES, SyntheticConfig  # torch import: only once the file parsed

    corpus = spec.data.corpus
    if not (corpus.startswith("text:") or corpus.lower() in CORPUS_NAMES):
        raise SpecError(file, "data.corpus", f"expected one of {', '.join(CORPUS_NAMES)} or text:PATH, "
                        f"got {_describe(corpus)}{_close(corpus, list(CORPUS_NAMES))}")
    options = {"synthetic": [f.name for f in fields(SyntheticConfig)], "tinyshakespeare": ["split"],
               "chinese-poetry": ["eval_set"]}.get(corpus.lower(), ["split"] if corpus.startswith("text:") else [])
    for key in spec.data.options:
        if key not in options:
            raise SpecError(file, f"data.options.{key}", f"unknown option for {corpus}; expected "
                            f"{'one of ' + ', '.join(options) if options else 'no options'}{_close(key, options)}")
    try:
        _corpus_options(corpus.lower()).model_validate(spec.data.options)
    except ValidationError as e:
        path, message = _message(e.errors()[0])
        raise SpecError(file, f"data.options.{path}", message) from None
    if corpus.lower() == "synthetic":
        try:
            SyntheticConfig(**spec.data.options)
        except (TypeError, ValueError) as e:
            raise SpecError(file, "data.options", f"expected valid synthetic options ({e})") from None


def check_semantics(file: str, spec: StudySpec) -> None:
    """What the schema alone cannot say: cross-references, value ranges per parameter, seeds."""
    _check_data(file, spec)
    if spec.model.arch == "single" and spec.model.depth != 1:
        raise SpecError(file, "model.depth", f"expected 1 for arch single, got {spec.model.depth}")
    _check_entry(file, "budget", "budget", spec.budget)
    if spec.budget.when:
        raise SpecError(file, "budget.when", "expected no condition on the budget")
    if not spec.phases:
        raise SpecError(file, "", "expected at least one phase: a search, evaluate or ablation section")
    if spec.search is not None:
        _check_space(file, spec)
    if spec.evaluate is not None:
        if spec.search is None:
            raise SpecError(file, "evaluate",
                            "expected a search section (evaluate re-runs the best search configurations)")
        clash = sorted(set(spec.evaluate.seeds) & {spec.search.seed})
        if clash:
            raise SpecError(file, "evaluate.seeds", f"expected seeds different from the tuning seed search.seed "
                            f"({spec.search.seed}), got {clash[0]}")
    if spec.ablation is not None:
        _check_ablation(file, spec)
        if spec.search is not None and spec.ablation.base == "search" and spec.search.seed in spec.ablation.seeds:
            raise SpecError(file, "ablation.seeds", f"expected seeds different from the tuning seed search.seed "
                            f"({spec.search.seed}), got {spec.search.seed}")
    if spec.resources.gpus_per_trial > 1 and spec.resources.gpus_per_trial != int(spec.resources.gpus_per_trial):
        raise SpecError(file, "resources.gpus_per_trial", "expected a fraction <= 1 or a whole number of GPUs, "
                        f"got {spec.resources.gpus_per_trial}")


def validate_spec(data: Any, file: str | Path = "<spec>") -> StudySpec:
    file = str(file)
    if not isinstance(data, dict):
        raise SpecError(file, "", f"expected a mapping of sections at the top level, got {_describe(data)}")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as e:
        path, message = _message(e.errors()[0])
        raise SpecError(file, path, message) from None
    check_semantics(file, spec)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; raises :class:`SpecError` (one line) on any problem."""
    return validate_spec(read_yaml(path), path)


def shrink_for_smoke(spec: StudySpec) -> StudySpec:
    """The same study, shrunk as its ``smoke`` section says, under the name ``<name>-smoke``."""
    s = spec.smoke
    data = spec.model_dump(mode="json", exclude_unset=False)
    data["name"] = f"{spec.name}-smoke"
    d = data["data"]
    d["max_train_tokens"] = min(d["max_train_tokens"] or s.max_train_tokens, s.max_train_tokens)
    d["max_eval_tokens"] = min(d["max_eval_tokens"] or s.max_eval_tokens, s.max_eval_tokens)
    data["model"] |= s.model.model_dump(exclude_unset=True)
    overrides = s.train.model_dump(exclude_unset=True)

    def shrink_train(train: dict[str, Any]) -> dict[str, Any]:
        train = train | overrides
        train["epochs"] = min(train["epochs"], s.epochs)
        if s.max_steps_per_epoch is not None:
            train["max_steps_per_epoch"] = min(train["max_steps_per_epoch"] or s.max_steps_per_epoch,
                                               s.max_steps_per_epoch)
        return train

    data["train"] = shrink_train(data["train"])
    if s.budget is not None:
        data["budget"] = {"type": "fixed", "value": s.budget}
    if data.get("search"):
        data["search"]["train"] = shrink_train(data["search"]["train"])
        data["search"]["num_samples"] = min(data["search"]["num_samples"] or s.num_samples, s.num_samples)
        data["search"]["scheduler"]["grace_period"] = 1
    if data.get("evaluate"):
        data["evaluate"]["train"] = shrink_train(data["evaluate"]["train"])
        data["evaluate"]["top_k"] = min(data["evaluate"]["top_k"], s.top_k)
        data["evaluate"]["seeds"] = data["evaluate"]["seeds"][: s.seeds]
    if data.get("ablation"):
        ab = data["ablation"]
        ab["train"] = shrink_train(ab["train"])
        ab["seeds"] = ab["seeds"][: s.seeds]
        if s.budget is not None:
            ab["params"].pop("budget", None)
            if "budget" in ab["factors"]:
                ab["factors"]["budget"] = [s.budget]
    return validate_spec(data, f"{spec.name} (--smoke)")
