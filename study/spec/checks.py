"""What the schema alone cannot say about a study file: cross-references between sections, the
value range of each parameter wherever it is named (space entries, ablation values), the corpus
and its options, seeds that must differ. Each problem is a ``SpecError`` naming its key path."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Literal, get_type_hints

from pydantic import Field, ValidationError, create_model

from study.spec.errors import SpecError, describe_value, did_you_mean, pydantic_problem
from study.spec.schema import (
    DATA_PARAMS,
    MAX_BUDGET,
    MIN_BUDGET,
    PARAM_NAMES,
    CategoricalEntry,
    FixedEntry,
    FloatEntry,
    IntEntry,
    ModelDefaults,
    Section,
    StudySpec,
    TrainDefaults,
    entry_values,
)


def _check_param_value(name: str, value: Any) -> str | None:
    """None if ``value`` is valid for parameter ``name``, else 'expected ...'."""
    field = "depth" if name == "layers" else name
    model = ModelDefaults if field in ModelDefaults.model_fields else TrainDefaults
    try:
        model.model_validate({field: value})
    except ValidationError as e:
        return pydantic_problem(e.errors()[0])[1]
    return None


def _check_budget_value(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < MIN_BUDGET:
        return f"expected a parameter count >= {MIN_BUDGET}, got {describe_value(value)}"
    if value > MAX_BUDGET:
        return (f"expected a parameter count <= {MAX_BUDGET:,} (larger models do not fit in memory), "
                f"got {describe_value(value)}")
    return None


def _check_data_value(name: str, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected an integer, got {describe_value(value)}"
    from nlstm.data import SyntheticConfig  # torch import: only once the file parsed

    if name in SyntheticConfig.BOUNDS:
        return _bound_problem(name, value)
    try:
        SyntheticConfig(**{name: value})
    except ValueError as e:
        return f"expected a valid {name} ({e})"
    return None


def _bound_problem(name: str, value: int) -> str | None:
    """'expected an integer in [low, high], got value' outside a synthetic option's bounds."""
    from nlstm.data import SyntheticConfig

    low, high = SyntheticConfig.BOUNDS[name]
    if low <= value <= high:
        return None
    why = (" (the size of enwik8; a larger split takes minutes and gigabytes to generate)"
           if name.endswith("_chars") and value > high else "")
    return f"expected an integer in [{low:,}, {high:,}]{why}, got {value:,}"


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
                            f"{did_you_mean(name, list(PARAM_NAMES))}")
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
                                    f"got {describe_value(value)}")
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


FAMILY_FIELDS = ("arch", "depth", "layers", "candidate_activation", "embedding_dim", "forget_bias", "impl")


def _check_families(file: str, spec: StudySpec) -> None:
    """``search.families``: each a set of model values that names one family, tuned alone with
    ``trials_per_family`` trials; the space must not sample what a family fixes."""
    from study.spec.configs import resolve

    s = spec.search
    assert s is not None
    if s.families is None:
        if s.trials_per_family is not None:
            raise SpecError(file, "search.trials_per_family", "expected search.families (the budget is per family)")
        return
    if s.trials_per_family is None:
        raise SpecError(file, "search.families", "expected search.trials_per_family: how many trials each family gets")
    if s.num_samples is not None:
        raise SpecError(file, "search.num_samples", "expected either num_samples or families with "
                        "trials_per_family, not both")
    names: dict[str, int] = {}
    fixed_keys: set[str] = set()
    for i, fixed in enumerate(s.families):
        path = f"search.families[{i}]"
        if "arch" not in fixed:
            raise SpecError(file, path, "expected an arch (nlstm, stacked or single)")
        for name, value in fixed.items():
            if name not in FAMILY_FIELDS:
                raise SpecError(file, f"{path}.{name}", f"expected one of the model fields {', '.join(FAMILY_FIELDS)}"
                                f"{did_you_mean(name, list(FAMILY_FIELDS))}")
            problem = _check_value(name, value)
            if problem:
                raise SpecError(file, f"{path}.{name}", problem)
        if fixed.get("arch") == "stacked" and "depth" in fixed:
            raise SpecError(file, f"{path}.depth", "expected layers for a stacked LSTM (its depth)")
        if fixed.get("arch") != "stacked" and "layers" in fixed:
            raise SpecError(file, f"{path}.layers", "expected depth (layers is the depth of a stacked LSTM)")
        family = resolve(spec, "search", dict(fixed)).family
        if family in names:
            raise SpecError(file, path, f"expected distinct families; {family} is also "
                            f"search.families[{names[family]}]")
        names[family] = i
        fixed_keys |= set(fixed)
    for name, entry in s.space.items():
        if name in fixed_keys or (name == "layers" and "arch" in fixed_keys):
            raise SpecError(file, f"search.space.{name}", "expected the families to fix it, not the space "
                            "(each family is tuned alone over the rest of the space)")
        if isinstance(entry, CategoricalEntry) and entry.balanced:
            raise SpecError(file, f"search.space.{name}.balanced", "expected no balanced entries with "
                            "search.families (every family already gets trials_per_family trials)")


def _check_ablation(file: str, spec: StudySpec) -> None:
    ab = spec.ablation
    assert ab is not None
    allowed = [*PARAM_NAMES, "budget", *DATA_PARAMS]
    for section, items in (("params", {k: [v] for k, v in ab.params.items()}), ("factors", ab.factors)):
        for name, values in items.items():
            path = f"ablation.{section}.{name}"
            if name not in allowed:
                raise SpecError(file, path, f"unknown parameter; expected one of {', '.join(allowed)}"
                                f"{did_you_mean(name, allowed)}")
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
                        f"got {describe_value(corpus)}{did_you_mean(corpus, list(CORPUS_NAMES))}")
    options = {"synthetic": [f.name for f in fields(SyntheticConfig)], "tinyshakespeare": ["split"],
               "chinese-poetry": ["eval_set"]}.get(corpus.lower(), ["split"] if corpus.startswith("text:") else [])
    for key in spec.data.options:
        if key not in options:
            expected = "one of " + ", ".join(options) if options else "no options"
            raise SpecError(file, f"data.options.{key}", f"unknown option for {corpus}; expected "
                            f"{expected}{did_you_mean(key, options)}")
    try:
        _corpus_options(corpus.lower()).model_validate(spec.data.options)
    except ValidationError as e:
        path, message = pydantic_problem(e.errors()[0])
        raise SpecError(file, f"data.options.{path}", message) from None
    if corpus.lower() == "synthetic":
        for key, value in spec.data.options.items():
            problem = _bound_problem(key, value) if key in SyntheticConfig.BOUNDS else None
            if problem:
                raise SpecError(file, f"data.options.{key}", problem)
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
        _check_families(file, spec)
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
