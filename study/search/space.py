"""The search's space and samplers, from the study file.

- ``DefineByRun``: the search space as an Optuna define-by-run function (conditional parameters
  are plain ``if``s on the values sampled before them), for one search family.
- ``tuning_families``: the search's families, each tuned alone with the same budget.
- ``make_sampler``: the Optuna sampler the file names (balanced categoricals allocated by ``BalancedSampler``).
- ``preview_search``: what the sampler proposes first (``--dry-run``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from study.spec.configs import TRIAL_NUMBER, condition_holds, resolve
from study.spec.schema import (
    CategoricalEntry,
    FixedEntry,
    FloatEntry,
    IntEntry,
    StudySpec,
)


def suggest(trial: Any, name: str, entry: Any) -> Any:
    if isinstance(entry, FloatEntry):
        return trial.suggest_float(name, entry.low, entry.high, log=entry.log, step=entry.step)
    if isinstance(entry, IntEntry):
        return trial.suggest_int(name, entry.low, entry.high, step=entry.step, log=entry.log)
    if isinstance(entry, CategoricalEntry):
        return trial.suggest_categorical(name, entry.choices)
    return entry.value


class DefineByRun:
    """The study's search space as an Optuna define-by-run function, for one search family.

    Every sampled value, the balanced ones included, is an Optuna parameter of the trial (so
    Optuna's importance, TPE and ``optuna-dashboard`` see it); ``BalancedSampler`` decides the
    balanced ones. ``fixed`` are the family's own model values (``search.families``): constants of
    every trial of that family, seen by ``when`` conditions. Returns the constants (fixed values and
    the Optuna trial number); the sampled values are the trial's ``params``. A parameter with ``when``
    is sampled only if the earlier values match.
    """

    def __init__(self, spec: StudySpec, fixed: dict[str, Any] | None = None) -> None:
        self.entries = space_entries(spec)
        self.fixed = dict(fixed or {})

    def __call__(self, trial: Any) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.fixed)
        constants: dict[str, Any] = {TRIAL_NUMBER: trial.number} | self.fixed
        for name, entry in self.entries:
            if not condition_holds(entry.when, values):
                continue
            values[name] = suggest(trial, name, entry)
            if isinstance(entry, FixedEntry):
                constants[name] = entry.value
        return constants


def space_entries(spec: StudySpec) -> list[tuple[str, Any]]:
    """The search's entries in sampling order: the budget (unless fixed), then the space."""
    entries = [] if isinstance(spec.budget, FixedEntry) else [("budget", spec.budget)]
    return entries + list((spec.search.space if spec.search else {}).items())


@dataclass(frozen=True)
class SearchFamily:
    """One tuning budget of the search: its own Optuna study, sampler and scheduler, ``trials`` trials.

    ``name`` is the family (``nlstm-d2-tanh``) when the study declares ``search.families``; it is ""
    for a search without families: one Optuna study over the whole space, where the architecture is a
    parameter like any other (balanced or sampled) and one sampler learns from every trial."""

    name: str
    fixed: dict[str, Any]
    trials: int
    optuna_study: str


def tuning_families(spec: StudySpec) -> list[SearchFamily]:
    """The search's families in the file's order (each tuned alone, with the same budget)."""
    s = spec.search
    assert s is not None
    if not s.families:
        return [SearchFamily("", {}, num_samples(spec), spec.name)]
    out = []
    for fixed in s.families:
        family = resolve(spec, "search", dict(fixed)).family
        out.append(SearchFamily(family, dict(fixed), s.trials_per_family or 1, f"{spec.name}/{family}"))
    return out


def balanced_value(entries: list[tuple[str, Any]], number: int, earlier: dict[str, Any], name: str) -> Any:
    """The value of balanced categorical ``name`` in trial ``number``: trial n takes the digits of
    n in the bases of the balanced entries that apply to it (in order), so each choice gets an
    equal share of the trials. ``earlier`` are the values sampled before ``name``."""
    values, turn = dict(earlier), number
    for entry_name, entry in entries:
        if isinstance(entry, FixedEntry):
            values.setdefault(entry_name, entry.value)
        if not condition_holds(entry.when, values):
            continue
        if isinstance(entry, CategoricalEntry) and entry.balanced:
            turn, digit = divmod(turn, len(entry.choices))
            if entry_name == name:
                return entry.choices[digit]
            values.setdefault(entry_name, entry.choices[digit])
    raise KeyError(f"{name} is not a balanced entry of the search space")


class BalancedSampler(optuna.samplers.BaseSampler):
    """The study's sampler, except that balanced categoricals are allocated by trial number
    (``balanced_value``) instead of sampled. Like Optuna's ``PartialFixedSampler``, the balanced
    parameters are kept out of the base sampler's relative search space; they are still the
    trial's parameters, so the base sampler learns from them like from any other."""

    def __init__(self, base: optuna.samplers.BaseSampler, entries: list[tuple[str, Any]]) -> None:
        self.base, self.entries = base, entries
        self.balanced = {n for n, e in entries if isinstance(e, CategoricalEntry) and e.balanced}

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial
                                    ) -> dict[str, optuna.distributions.BaseDistribution]:
        space = self.base.infer_relative_search_space(study, trial)
        return {n: d for n, d in space.items() if n not in self.balanced}

    def sample_relative(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        search_space: dict[str, optuna.distributions.BaseDistribution]) -> dict[str, Any]:
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> Any:
        if param_name in self.balanced:
            return balanced_value(self.entries, trial.number, trial.params, param_name)
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: Any,
                    values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def grid_space(spec: StudySpec) -> dict[str, list[Any]]:
    """The grid sampler's search space: every value of every non-fixed entry."""
    grid: dict[str, list[Any]] = {}
    for name, entry in [("budget", spec.budget), *(spec.search.space.items() if spec.search else [])]:
        if isinstance(entry, CategoricalEntry) and not entry.balanced:
            grid[name] = list(entry.choices)
        elif isinstance(entry, IntEntry):
            grid[name] = list(range(entry.low, entry.high + 1, entry.step))
        elif isinstance(entry, FloatEntry):
            n = int(round((entry.high - entry.low) / entry.step))
            grid[name] = [entry.low + i * entry.step for i in range(n + 1)]
    return grid


def num_samples(spec: StudySpec) -> int:
    """Search trials in all: ``trials_per_family`` x families, or ``num_samples`` (default 10; grid: its size)."""
    assert spec.search is not None
    if spec.search.families:
        return (spec.search.trials_per_family or 1) * len(spec.search.families)
    if spec.search.num_samples is not None:
        return spec.search.num_samples
    if spec.search.sampler.type == "grid":
        sizes = [len(v) for v in grid_space(spec).values()]
        return max(1, math.prod(sizes))
    return 10


# Samplers whose random draws come from a generator seeded once, at construction, and kept in memory only:
# built again with the same seed for a study that already has trials, they would propose those trials again.
REPLAYING_SAMPLERS = ("tpe", "random", "cmaes")


def make_sampler(spec: StudySpec, trials_so_far: int = 0) -> optuna.samplers.BaseSampler:
    """The file's sampler, with its balanced categoricals allocated by ``BalancedSampler``.

    ``trials_so_far``: the trials the family's Optuna study already holds (a resumed study). TPE's, random and
    CMA-ES's generators are seeded with ``search.sampler.seed + trials_so_far`` so that a sampler built again
    never replays the proposals it made before the driver stopped (a fresh study: the file's seed itself). QMC
    and grid keep the file's seed: they continue their sequence from the storage."""
    entries = space_entries(spec)
    base = _base_sampler(spec, trials_so_far if spec.search and spec.search.sampler.type in REPLAYING_SAMPLERS
                         else 0)
    if any(isinstance(e, CategoricalEntry) and e.balanced for _, e in entries):
        return BalancedSampler(base, entries)
    return base


def _base_sampler(spec: StudySpec, offset: int = 0) -> optuna.samplers.BaseSampler:
    assert spec.search is not None
    s = spec.search.sampler
    seed = s.seed + offset
    startup = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    if s.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=s.multivariate, **startup)
    if s.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.type == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, **startup)
    if s.type == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=s.seed, qmc_type=s.qmc_type)
    return optuna.samplers.GridSampler(grid_space(spec), seed=s.seed)


def sampler_description(spec: StudySpec) -> str:
    if spec.search is None:
        return "none"
    s = spec.search.sampler
    return f"{s.type}(seed={s.seed})"


def scheduler_description(spec: StudySpec) -> str:
    if spec.search is None:
        return "none"
    s = spec.search.scheduler
    if s.type == "asha":
        return f"asha(grace_period={s.grace_period}, reduction_factor={s.reduction_factor:g})"
    if s.type == "median":
        return f"median(grace_period={s.grace_period}, min_samples_required={s.min_samples_required})"
    return "none"


def preview_search(spec: StudySpec, n: int, fixed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The first ``n`` configurations the sampler proposes (for the family that fixes ``fixed``) before it
    has seen any result (TPE's and CMA-ES's startup trials are random; QMC, random and grid are fixed
    sequences)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.create_study(sampler=make_sampler(spec), direction="minimize")
    space = DefineByRun(spec, fixed)
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = space(trial)
        out.append(trial.params | constants)
        try:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)  # no value: nothing to learn from
        except RuntimeError:  # GridSampler calls study.stop() once the grid is exhausted
            break
    return out


