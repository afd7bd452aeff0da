"""Probability of improvement (Bouthillier et al., "Accounting for Variance in Machine Learning Benchmarks",
MLSys 2021): the share of seed pairs in which the Nested LSTM has the lower (better) BPC, ties counting
half, beside the mean difference: a difference of +0.01 BPC may still be one that nesting loses in
every seed.

Pairs are the *common* seeds: a seed both arms learned on (the same data order and initial stream). A
seed only one arm has is left out of this statistic and counted (``n_unpaired``); with no common seed
there is no estimate. The interval is the percentile bootstrap over pairs
(``scipy.stats.bootstrap(method="percentile")``, seeded, so a report is reproducible); with fewer than
:data:`MIN_PAIRS` pairs it is not given (a bootstrap of two pairs can only say 0, 0.5 or 1).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

MIN_PAIRS = 3
N_RESAMPLES = 10_000
SEED = 0
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Improvement:
    share: float  # P(nested better) over the common seeds; NaN without any
    low: float  # percentile-bootstrap interval; NaN with fewer than MIN_PAIRS pairs
    high: float
    n_pairs: int
    n_unpaired: int  # seeds of either arm without a partner in the other (left out)

    def text(self) -> str:
        """``0.83 [0.50, 1.00] (6 pairs)``, ``1.00 (2 pairs; no interval)`` or ``n/a``."""
        if not np.isfinite(self.share):
            return "n/a"
        pairs = f"{self.n_pairs} pair{'s' if self.n_pairs != 1 else ''}"
        left = f", {self.n_unpaired} unpaired seed{'s' if self.n_unpaired != 1 else ''} left out" \
            if self.n_unpaired else ""
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return f"{self.share:.2f} ({pairs}; no interval{left})"
        return f"{self.share:.2f} [{self.low:.2f}, {self.high:.2f}] ({pairs}{left})"


def wins(nested: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per pair: 1 where nested is lower (better), 0.5 on a tie, 0 where it is higher."""
    nested, other = np.asarray(nested, float), np.asarray(other, float)
    return np.where(nested < other, 1.0, np.where(nested == other, 0.5, 0.0))


def probability_of_improvement(nested: pd.Series, other: pd.Series, n_resamples: int = N_RESAMPLES,
                               seed: int = SEED) -> Improvement:
    """From two per-seed series (index: seed) of a lower-is-better metric."""
    common = nested.index.intersection(other.index)
    unpaired = len(nested.index.symmetric_difference(other.index))
    if len(common) == 0:
        return Improvement(math.nan, math.nan, math.nan, 0, unpaired)
    w = wins(nested[common].to_numpy(float), other[common].to_numpy(float))
    share = float(w.mean())
    if len(w) < MIN_PAIRS:
        return Improvement(share, math.nan, math.nan, len(w), unpaired)
    if np.all(w == w[0]):  # every resample gives the same share (scipy warns of degenerate data)
        return Improvement(share, share, share, len(w), unpaired)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((w,), np.mean, method="percentile", confidence_level=CONFIDENCE,
                              n_resamples=n_resamples, rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Improvement(share, float(ci.low), float(ci.high), len(w), unpaired)
