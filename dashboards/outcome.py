"""Did a run learn? The bar every character model must clear, and each trial run's outcome.

A model that ignores context scores the corpus's unigram entropy; one that guesses uniformly scores
``log2(V)`` for a vocabulary of V symbols. A run whose validation or test BPC is not clearly below that
bar has not learned anything, whatever its MLflow status says: with a learning rate far too high a
trial "completes" at 15-700 BPC, and such numbers must never enter a mean, an interval or a test.
The rule is the project's one chance rule, :func:`study.record.layout.below_chance` (the trainer and the
driver use it too): learned only if ``CHANCE_MARGIN_BITS`` (0.1 bit) below chance.

Chance, per run, from the most specific record available (``docs/report.md`` lists the keys):

1. the corpus's unigram entropy, ``unigram_entropy_bits`` (or ``unigram_entropy``), logged on the
   trial run (param or metric) or as a data param of the study's parent run;
2. only where no entropy is recorded, ``log2(vocab_size)``, from a ``vocab_size`` param of the trial or
   the parent run: an upper bound of the entropy, so a more lenient bar (the report says which bar it used);
3. else ``log2(V)`` with V solved from the run's own parameter count: :func:`nlstm.params.lm_parameters`
   is linear in V for a fixed architecture, width and embedding size, and only an exact integer
   solution is accepted. Every store written by ``study/`` records what this needs, so old stores
   are judged too.

Outcomes: ``learned`` (the only runs statistics use), ``did not learn`` (a failed run whose reason
starts with "diverged" or "did not learn", or a completed run not 0.1 bit below chance or without a
finite BPC), ``failed`` (any other failure), ``pruned`` (stopped early by the scheduler) and
``running`` (not finished; counted, never judged).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from study.record.layout import CHANCE_MARGIN_BITS, below_chance

LEARNED, NOT_LEARNED, FAILED, PRUNED, RUNNING = "learned", "did not learn", "failed", "pruned", "running"
OUTCOMES = (LEARNED, NOT_LEARNED, FAILED, PRUNED, RUNNING)
EXCLUDED = (NOT_LEARNED, FAILED, PRUNED)  # finished runs that the statistics leave out
ENTROPY_KEYS = ("unigram_entropy_bits", "unigram_entropy")
VOCAB_KEYS = ("vocab_size",)
NOT_LEARNED_REASONS = ("diverged", "did not learn")
BPC_COLUMNS = {"best_valid_bpc": "valid", "test_bpc": "test"}


def _number(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def _column(trials: pd.DataFrame, keys: tuple[str, ...]) -> pd.Series:
    """The first of ``keys`` the run recorded, as a float (NaN where none)."""
    out = pd.Series(math.nan, index=trials.index, dtype=float)
    for key in keys:
        if key in trials:
            out = out.fillna(pd.to_numeric(trials[key], errors="coerce").astype(float))
    return out


def _first(params: dict[str, Any], keys: tuple[str, ...]) -> float:
    for key in keys:
        x = _number(params.get(key))
        if math.isfinite(x):
            return x
    return math.nan


def vocab_from_parameter_count(arch: str, depth: int, width: int, embedding_dim: int | None,
                               num_params: int) -> int | None:
    """The vocabulary size V for which ``lm_parameters(arch, depth, width, V, embedding_dim) == num_params``,
    or None when no integer V >= 2 gives exactly that count (the identity params are then not what we think)."""
    from nlstm.params import lm_parameters  # only for stores that record neither the entropy nor the vocabulary

    try:
        base = lm_parameters(arch, depth, width, 0, embedding_dim)
        per_symbol = lm_parameters(arch, depth, width, 1, embedding_dim) - base
    except (ValueError, TypeError):
        return None
    vocab, remainder = divmod(int(num_params) - base, per_symbol)
    if remainder or vocab < 2 or lm_parameters(arch, depth, width, vocab, embedding_dim) != num_params:
        return None
    return int(vocab)


def _inferred_vocab(row: pd.Series) -> float:
    try:
        arch, depth, width, count = str(row["arch"]), int(row["depth"]), int(row["width"]), int(row["num_params"])
    except (KeyError, TypeError, ValueError):
        return math.nan
    emb = row.get("embedding_dim")
    embedding = None if emb is None or pd.isna(emb) else int(emb)  # logged as "None" for one-hot input
    vocab = vocab_from_parameter_count(arch, depth, width, embedding, count)
    return math.nan if vocab is None else float(vocab)


def chance_levels(trials: pd.DataFrame, parent_params: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per run: ``chance_bpc`` (the bar) and ``chance_source`` (which record it came from; "unknown" if none)."""
    params = parent_params or {}
    bar = pd.Series(math.nan, index=trials.index, dtype=float)
    source = pd.Series("unknown", index=trials.index, dtype=object)

    def take(values: pd.Series, label: pd.Series | str) -> None:
        fill = bar.isna() & values.notna()
        bar[fill] = values[fill]
        source[fill] = label[fill] if isinstance(label, pd.Series) else label

    take(_column(trials, ENTROPY_KEYS), "unigram entropy")
    take(pd.Series(_first(params, ENTROPY_KEYS), index=trials.index), "unigram entropy")
    vocab = _column(trials, VOCAB_KEYS).fillna(_first(params, VOCAB_KEYS))
    take(np.log2(vocab.where(vocab >= 2)), "log2(vocabulary " + vocab.map(lambda v: f"{v:.0f}") + ")")
    if bar.isna().any() and {"arch", "depth", "width", "num_params"} <= set(trials.columns):
        missing = trials[bar.isna()]
        inferred = missing.apply(_inferred_vocab, axis=1) if len(missing) else pd.Series(dtype=float)
        inferred = inferred.reindex(trials.index)
        take(np.log2(inferred), "log2(vocabulary " + inferred.map(lambda v: f"{v:.0f}") +
             ", from the parameter count)")
    return pd.DataFrame({"chance_bpc": bar, "chance_source": source})


def _judge(row: pd.Series) -> tuple[str, str]:
    state, reason = row["state"], row.get("fail_reason")
    reason = "" if reason is None or pd.isna(reason) else str(reason)
    if state == "running":
        return RUNNING, ""
    if state == "pruned":
        return PRUNED, "stopped early by the scheduler"
    if state == "failed":
        if reason.lower().startswith(NOT_LEARNED_REASONS):
            return NOT_LEARNED, reason
        return FAILED, reason or f"MLflow status {row.get('mlflow_status')}"
    valid = _number(row.get("best_valid_bpc"))
    if not math.isfinite(valid):
        return NOT_LEARNED, "no finite validation BPC"
    test = row.get("test_bpc")
    if test is not None and not pd.isna(test) and not math.isfinite(float(test)):
        return NOT_LEARNED, "no finite test BPC"
    bar = row["chance_bpc"]
    if math.isfinite(bar):
        for column, label in BPC_COLUMNS.items():
            value = _number(row.get(column))
            if math.isfinite(value) and not below_chance(value, bar):
                return NOT_LEARNED, (f"{label} BPC {value:.3f} is not {CHANCE_MARGIN_BITS:g} bit below chance, "
                                     f"{bar:.3f} ({row['chance_source']})")
    return LEARNED, ""


def classify_runs(trials: pd.DataFrame, parent_params: dict[str, Any] | None = None) -> pd.DataFrame:
    """``trials`` with ``chance_bpc``, ``chance_source``, ``outcome`` (one of :data:`OUTCOMES`) and
    ``outcome_reason`` (why a run is excluded; empty for learned and running runs)."""
    out = pd.concat([trials.drop(columns=["chance_bpc", "chance_source"], errors="ignore"),
                     chance_levels(trials, parent_params)], axis=1)
    if out.empty:
        return out.assign(outcome=pd.Series(dtype=object), outcome_reason=pd.Series(dtype=object))
    judged = out.apply(_judge, axis=1, result_type="expand")
    return out.assign(outcome=judged[0].astype(object), outcome_reason=judged[1].astype(object))


def exclusion_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Runs per outcome (every outcome present as a key)."""
    counts = runs["outcome"].value_counts() if len(runs) else pd.Series(dtype=int)
    return {o: int(counts.get(o, 0)) for o in OUTCOMES}


def exclusion_text(runs: pd.DataFrame) -> str:
    """How many finished runs were left out and why: ``"2 of 5 (1 did not learn, 1 failed)"`` or ``"none of 5"``."""
    counts = exclusion_counts(runs)
    finished = sum(counts[o] for o in (LEARNED, *EXCLUDED))
    excluded = sum(counts[o] for o in EXCLUDED)
    running = f"; {counts[RUNNING]} still running" if counts[RUNNING] else ""
    if not excluded:
        return f"none of {finished}{running}"
    why = ", ".join(f"{counts[o]} {o}" for o in EXCLUDED if counts[o])
    return f"{excluded} of {finished} ({why}){running}"
