"""Which edits of a study file extend the study and which would invalidate what it already ran.

A study grows: a researcher adds evaluation seeds after seeing a wide interval, raises every family's
tuning budget, adds a family or an ablation level, or a whole phase. Rerunning the same command then
runs only the new work and keeps every finished run. These fields are **additive** (they may only grow;
everything already in them must stay):

- ``search.num_samples``, ``search.trials_per_family``: a larger number (the same Optuna studies go on);
- ``search.families``: new families (each gets its own Optuna study and the same budget);
- ``evaluate.seeds``, ``ablation.seeds``: new seeds;
- ``evaluate.top_k``: a larger number;
- ``ablation.factors.<name>``: new values of an existing factor;
- a new ``search``, ``evaluate`` or ``ablation`` section.

These never change a trial and may change freely: ``description``, ``resources``, ``budget_tolerance``,
``smoke`` and ``search.max_concurrent``. Any other change (data, budget, model or training settings,
the search space, sampler or scheduler, the tuning seed, ``evaluate.per``, an ablation's base or
params, a removed value) would change what finished runs mean: it is refused in one line naming the
field, with ``--restart`` (or another study name) as the way out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FREE = ("description", "resources", "budget_tolerance", "smoke", "search.max_concurrent")
GROWING_NUMBERS = ("search.num_samples", "search.trials_per_family", "evaluate.top_k")
GROWING_LISTS = ("search.families", "evaluate.seeds", "ablation.seeds")
OPTIONAL_SECTIONS = ("search", "evaluate", "ablation")


@dataclass
class SpecChange:
    additions: list[str] = field(default_factory=list)  # what the edit adds, for the driver's note
    invalid: str | None = None  # the first field whose change would invalidate finished runs


def _text(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def compare_specs(old: dict[str, Any], new: dict[str, Any]) -> SpecChange:
    """Compare two validated specs (``StudySpec.model_dump(mode="json")``)."""
    change = SpecChange()
    _compare(old, new, "", change)
    return change


def _compare(old: Any, new: Any, path: str, change: SpecChange) -> None:
    if change.invalid is not None or path in FREE:
        return
    if path in OPTIONAL_SECTIONS and old is None and new is not None:
        change.additions.append(f"a new {path} phase")
        return
    if path in GROWING_NUMBERS and isinstance(old, int) and isinstance(new, int) and new >= old:
        if new > old:
            change.additions.append(f"{path} {old} -> {new}")
        return
    if (path in GROWING_LISTS or path.startswith("ablation.factors.")) and isinstance(old, list) \
            and isinstance(new, list):
        missing = [v for v in old if v not in new]
        if missing:
            change.invalid = f"{path}: {_text(missing[0])} was removed (only additions keep the finished runs)"
        elif len(new) > len(old):
            change.additions.append(f"{path} + {_text([v for v in new if v not in old])}")
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            _compare(old.get(key), new.get(key), f"{path}.{key}" if path else key, change)
        return
    if old != new:
        change.invalid = f"{path or 'the study'}: {_text(old)} -> {_text(new)}"
