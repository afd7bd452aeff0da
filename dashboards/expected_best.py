"""Expected best validation BPC against the number of tuning trials, per family (Dodge et al., "Show Your
Work: Improved Reporting of Experimental Results", EMNLP 2019).

A family that wins after 16 tuning trials may lose after 4: the comparison depends on the tuning budget.
Dodge et al. estimate, from the N trials a search ran, the expected best score of a search that had run
only n of them: the expectation of the best of n i.i.d. draws from the empirical distribution of the N
values. For BPC (lower is better) the best is the minimum; with the values sorted ascending,
``v_(1) <= ... <= v_(N)``,

    E[min of n] = sum_i v_(i) * ((1 - (i-1)/N)^n - (1 - i/N)^n),      n = 1 .. N,

since ``(1 - (i-1)/N)^n`` is the probability that all n draws are at least ``v_(i)``. At n = 1 it is the
mean, and it falls to the sample minimum's neighbourhood as n grows. The band is a percentile bootstrap:
the N values resampled with replacement (``scipy.stats.bootstrap``, seeded), the curve recomputed for
each resample, its 2.5 and 97.5 percentiles per n. With fewer than :data:`MIN_TRIALS` values there is no
band.

Only search trials trained to the search fidelity enter: ``completed`` search trials with a finite best
validation BPC. Trials a scheduler stopped early (``pruned``) and failed trials did not, and are counted
and left out (the report says how many); as a scheduler stops the worse trials, the curve then describes
the trials it let finish. Completed trials that did not learn are draws of the tuning like any other and
enter.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from dashboards.search_trials import search_trials
from dashboards.stats import sorted_families
from study.record.layout import SEARCH_BUDGET_TAG, SEARCH_FIDELITY_TAG

MIN_TRIALS = 3
N_RESAMPLES = 2_000
SEED = 0
CONFIDENCE = 0.95
COLUMNS = ["family", "n_trials", "expected_best_valid_bpc", "band_low", "band_high"]


def expected_min(values) -> np.ndarray:
    """E[min of n i.i.d. draws from the empirical distribution of ``values``] for n = 1 .. N."""
    v = np.sort(np.asarray(values, dtype=float))
    return _curve(v)


def _curve(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """The curve of each sample along ``axis`` (vectorised for scipy.stats.bootstrap: curve index first)."""
    v = np.sort(np.moveaxis(np.asarray(v, dtype=float), axis, -1), axis=-1)
    size = v.shape[-1]
    i = np.arange(1, size + 1)
    n = np.arange(1, size + 1)[:, None]
    weights = (1 - (i - 1) / size) ** n - (1 - i / size) ** n  # (n, i): P(min of n draws = v_(i))
    return np.moveaxis(v @ weights.T, -1, 0)


def expected_min_band(values, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap band of :func:`expected_min` (NaN with fewer than MIN_TRIALS values)."""
    v = np.asarray(values, dtype=float)
    if len(v) < MIN_TRIALS:
        return np.full(len(v), math.nan), np.full(len(v), math.nan)
    if np.all(v == v[0]):
        return v.copy(), v.copy()
    res = stats.bootstrap((v,), _curve, vectorized=True, method="percentile", confidence_level=CONFIDENCE,
                          n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return np.asarray(res.confidence_interval.low, float), np.asarray(res.confidence_interval.high, float)


def expected_best_table(trials: pd.DataFrame) -> pd.DataFrame:
    """``tables/expected_best.csv``: one row per family x n (1 .. its N completed search trials)."""
    entering = search_trials(trials).entering
    rows = []
    for family in sorted_families(entering["family"]):
        values = entering.loc[entering["family"] == family, "best_valid_bpc"].astype(float).to_numpy()
        curve, (low, high) = expected_min(values), expected_min_band(values)
        rows += [{"family": family, "n_trials": n, "expected_best_valid_bpc": curve[n - 1], "band_low": low[n - 1],
                  "band_high": high[n - 1]} for n in range(1, len(values) + 1)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["n_trials"] = table["n_trials"].astype("int64")
    return table


# ---------------------------------------------------------------------------- the report's words
def _ranges(ns: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out, start = [], None
    for k, n in enumerate(ns):
        if start is None:
            start = n
        if k + 1 == len(ns) or ns[k + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)


def _ranking(table: pd.DataFrame, n: int) -> list[str]:
    at = table[table["n_trials"] == n].sort_values(["expected_best_valid_bpc", "family"], kind="stable")
    return list(at["family"])


def _value(table: pd.DataFrame, family: str, n: int) -> str:
    row = table[(table["family"] == family) & (table["n_trials"] == n)].iloc[0]
    band = (f" [{row['band_low']:.3f}, {row['band_high']:.3f}]" if np.isfinite(row["band_low"])
            and np.isfinite(row["band_high"]) else " (no band: fewer than 3 trials)")
    return f"{family} {row['expected_best_valid_bpc']:.3f}{band}"


def _overlap(table: pd.DataFrame, a: str, b: str, n: int) -> bool | None:
    ra = table[(table["family"] == a) & (table["n_trials"] == n)].iloc[0]
    rb = table[(table["family"] == b) & (table["n_trials"] == n)].iloc[0]
    bounds = [ra["band_low"], ra["band_high"], rb["band_low"], rb["band_high"]]
    if not all(np.isfinite(bounds)):
        return None
    return bool(ra["band_low"] <= rb["band_high"] and rb["band_low"] <= ra["band_high"])


def ranking_verdict(table: pd.DataFrame) -> str:
    """At which tuning budgets n the ranking of the families holds, and where their bands overlap."""
    families = sorted_families(table["family"])
    if len(families) < 2:
        return ""
    n_max = int(table.groupby("family")["n_trials"].max().min())  # every family has run this many
    final = _ranking(table, n_max)
    holds = [n for n in range(1, n_max + 1) if _ranking(table, n) == final]
    first = n_max
    while first - 1 in holds:
        first -= 1
    order = " < ".join(final)
    text = (f"Ranking by expected best valid BPC at n = {n_max} tuning trials (the most every family ran; mean and "
            f"95 % bootstrap band): {'; '.join(_value(table, f, n_max) for f in final)}. The order {order} holds "
            + ("at n = 1 (each family ran one trial)." if n_max == 1 else
               f"at every budget n = 1-{n_max}." if first == 1 else
               f"from n = {first} to {n_max}; with fewer trials it differs (at n = {first - 1}: "
               f"{' < '.join(_ranking(table, first - 1))})."))
    pairs = []
    for a, b in zip(final, final[1:], strict=False):
        flags = {n: _overlap(table, a, b, n) for n in range(1, n_max + 1)}
        if any(v is None for v in flags.values()):
            pairs.append(f"{a} and {b}: no band (fewer than 3 trials)")
            continue
        overlapping = [n for n, v in flags.items() if v]
        if not overlapping:
            pairs.append(f"{a} and {b} do not overlap at any n")
        elif len(overlapping) == n_max:
            pairs.append(f"{a} and {b} overlap at every n (their order is not clear at any budget)")
        else:
            pairs.append(f"{a} and {b} overlap at n = {_ranges(overlapping)}")
    return text + " Bands of neighbours in this order: " + "; ".join(pairs) + "."


def budget_sentence(parent_tags: dict[str, str] | None, trials: pd.DataFrame) -> str:
    """The tuning budget per family and the search fidelity (recorded on the parent run, else counted), and
    which search trials enter the curves."""
    tags = parent_tags or {}
    found = search_trials(trials)
    families = sorted_families(found.total.index)
    counted = ", ".join(f"{f} {int(found.total[f])}" for f in families)
    if tags.get(SEARCH_BUDGET_TAG):
        budget = (f"Tuning budget: {tags[SEARCH_BUDGET_TAG]} trials per family (recorded; search trials found: "
                  f"{counted}).")
    else:
        budget = (f"Tuning budget per family not recorded (a study before per-family budgets); counted from the "
                  f"search trials: {counted}.")
    fidelity = tags.get(SEARCH_FIDELITY_TAG)
    budget += f" Search fidelity: {fidelity}." if fidelity else " Search fidelity: not recorded."
    entering = found.entering.groupby("family").size()
    budget += (" Entering the curves (completed at the search fidelity): "
               + ", ".join(f"{f} {int(entering.get(f, 0))}" for f in families) + ".")
    pruned, failed, running = (int(s.sum()) for s in (found.pruned, found.failed, found.running))
    if pruned:
        per = ", ".join(f"{f} {int(found.pruned[f])}" for f in families if found.pruned.get(f, 0))
        budget += (f" {pruned} trial{'s' if pruned > 1 else ''} stopped early by the scheduler (pruned: {per}) did "
                   "not train to the search fidelity and are excluded; since a scheduler stops the worse trials, "
                   "the curves describe the trials it let finish.")
    if failed:
        budget += f" {failed} failed trial{'s' if failed > 1 else ''} (no finite BPC) excluded."
    if running:
        budget += f" {running} still running."
    if found.repeated:
        per = ", ".join(f"{f} {n}" for f, n in sorted(found.repeated.items()))
        budget += (f" Trials that repeated a configuration an earlier trial of their family had trained (they "
                   f"tuned nothing, and the verdicts count distinct configurations): {per}.")
    return budget
