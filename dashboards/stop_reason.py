"""Why a trial run stopped training, and what a comparison of its BPC may therefore claim.

A run that stopped at its *plateau* (validation BPC no longer improving) shows where its model ends; a run
that stopped at its epoch cap (*max_epochs*) or its time budget shows only how far it got, i.e. how fast
it learns. Runs recorded since ``study.record.layout.STOP_REASON_TAG`` exists say which (:data:`STOP_REASONS`).

Older records lack the tag. Their reason is derived only where the record leaves no doubt:

- status ``pruned`` (the scheduler stopped it): ``pruned``;
- status ``interrupted`` (its driver was stopped): ``interrupted``;
- status ``failed``: ``diverged`` when ``nlstm.fail_reason`` starts with "diverged", else ``failed``;
- status ``completed`` with every epoch run (``epochs_run`` equal to the ``epochs`` param) and the
  ``patience`` param recorded as none (early stopping off): ``max_epochs``. With patience set, a run that
  ran every epoch may still have stopped at a plateau reached on its last epoch, so it stays blank;
  so does a completed run that stopped before its last epoch (plateau or time budget: not recorded).

Anything else is blank (``""``): not recorded.

Where a model ends is a claim about the model, so it also needs each family tuned as hard as the other
(Melis et al., ICLR 2018): :func:`tuning_gap` says whether two arms were. Runs of one shared setting that all
reached their plateau show where the models *settle at that setting*, never where they end.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from study.record.layout import STOP_REASONS

PLATEAU, MAX_EPOCHS = "plateau", "max_epochs"
NOT_RECORDED = ""


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def derive_stop_reason(tag: str | None, status: str | None, fail_reason: str | None, params: dict[str, str],
                       epochs_run: float | None) -> tuple[str, str]:
    """``(stop_reason, source)``: the recorded tag (source ``recorded``), else a reason the record makes
    certain (source ``derived``), else ``("", "")``. ``params`` are the run's MLflow params as strings."""
    if tag in STOP_REASONS:
        return tag, "recorded"
    if status in ("pruned", "interrupted"):
        return status, "derived"
    if status == "failed":
        return ("diverged" if str(fail_reason or "").lower().startswith("diverged") else "failed"), "derived"
    if status == "completed" and "patience" in params and params["patience"].strip().lower() in ("none", "null", ""):
        epochs, ran = _number(params.get("epochs")), _number(epochs_run)
        if math.isfinite(epochs) and ran == epochs:
            return MAX_EPOCHS, "derived"
    return NOT_RECORDED, ""


def stop_counts(reasons) -> Counter:
    """Runs per stop reason; blank reasons count as ``not recorded``."""
    return Counter(r if isinstance(r, str) and r else "not recorded" for r in reasons)


def describe_counts(counts: Counter) -> str:
    """``"3 plateau, 2 max_epochs"`` (in the order of :data:`STOP_REASONS`, unknown last); ``""`` for none."""
    order = [*STOP_REASONS, "not recorded"]
    return ", ".join(f"{counts[r]} {r}" for r in order if counts.get(r))


def tuning_gap(protocol: str, nested: str, other: str, search_trials: dict[str, int],
               distinct: dict[str, int] | None = None) -> str:
    """``""`` when the two families were tuned with the same budget, else why not (a phrase).

    Equal tuning: the arms are the ``evaluate`` phase's (each family's configuration chosen from its own
    search trials), and the record holds the same, non-zero number of ended search trials for both families,
    and as many distinct configurations among them (``distinct``: a trial that repeated an earlier one of its
    family tuned nothing). An ablation's or any other phase's configurations are set by the study, not tuned
    per family."""
    if protocol.split(",", 1)[0] != "evaluate":
        return f"the \"{protocol}\" runs use configurations the study set, not ones tuned per family"
    counts = {f: int(search_trials.get(f, 0)) for f in (nested, other)}
    if not all(counts.values()):
        untuned = " and ".join(f for f, n in counts.items() if not n)
        return f"the record has no search trials of {untuned}"
    if counts[nested] != counts[other]:
        return f"unequal tuning budgets (search trials: {nested} {counts[nested]}, {other} {counts[other]})"
    unique = {f: int((distinct or {}).get(f, counts[f])) for f in (nested, other)}
    if unique[nested] != unique[other]:
        return (f"unequal tuning budgets ({counts[nested]} search trials each, but distinct configurations: "
                f"{nested} {unique[nested]}, {other} {unique[other]})")
    return ""


def ending_sentence(nested: str, other: str, nested_is_lower: bool, nested_stops: Counter,
                    other_stops: Counter, metric: str, untuned: str = "") -> str:
    """What a clear difference in ``metric`` says, worded by how the compared runs stopped and were tuned.

    Only when every run of both arms stopped at its plateau, and both families were tuned with the same
    budget (``untuned`` empty, :func:`tuning_gap`), does a lower BPC mean that one model *ends* better; runs
    at their plateau without equal tuning say where the models settle at the configurations compared;
    otherwise the runs were cut off by their training budget and the difference says which learns faster
    within it."""
    total = nested_stops + other_stops
    n = sum(total.values())
    if n and total[PLATEAU] == n:
        word = "better" if nested_is_lower else "worse"
        if untuned:
            return (f"Every run of both arms stopped at its plateau ({n} runs), but {untuned}, so this says "
                    f"{nested} settles {word} than {other} at the configurations compared, not that it ends "
                    f"{word} once each family is tuned.")
        return (f"Every run of both arms stopped at its plateau ({n} runs) and both families were tuned with "
                f"the same budget, so {nested} ends {word} than {other}.")
    word = "faster" if nested_is_lower else "more slowly"
    if n and total["not recorded"] == n:
        return (f"No stop reason is recorded for these {n} runs (records before nlstm.stop_reason), so this says "
                f"{nested} learns {word} than {other} within the training budget, not where it ends ({metric}).")
    parts = [f"{total[MAX_EPOCHS]} of {n} runs stopped at max_epochs"]
    parts += [f"{total[r]} {'at their plateau' if r == PLATEAU else r}" for r in STOP_REASONS
              if r != MAX_EPOCHS and total[r]]
    if total["not recorded"]:
        parts.append(f"{total['not recorded']} with no recorded stop reason")
    return (f"Not every run stopped at its plateau ({', '.join(parts)}), so this says {nested} learns {word} than "
            f"{other} within the training budget, not where it ends ({metric}).")
