"""Valid BPC at equal training time: the time-matched statistic behind figure 3.

Parameter-matched is not compute-matched (a Nested LSTM's levels run one after another within a step), so the
report also compares the families at the same training time. Definition, per protocol and budget:

- ``T*`` = the smallest final cumulative ``train_time_s`` (training seconds, evaluation excluded, at the run's last
  evaluation) among the runs that entered the statistics (``AnalysisSet.selected``: the learned runs of each arm's
  representative configuration). Every such run trained at least ``T*`` seconds; a run that did not learn, or one
  of a configuration that does not represent its arm, does not set it.
- Per run: valid BPC at ``T*`` = linear interpolation (``np.interp``) of its ``(train_time_s, valid_bpc)`` epoch
  history at ``T*``. When ``T*`` lies before the run's first evaluation the value is NaN, not extrapolated (the
  report counts such runs per arm: "no evaluation before T*"). A run evaluated once (at its end) is therefore
  NaN unless it is the shortest run: the equal-time view needs several evaluations per run.

The values enter :data:`dashboards.stats.METRICS` as ``valid_bpc_equal_time`` and are compared like any other
metric (paired t-test by seed, etc.). Pure pandas/numpy: the history is ``StudyData.histories``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from dashboards.load import pivot_epochs
from dashboards.stats import EQUAL_TIME, EQUAL_TIME_S, AnalysisSet

POINTS = ("train_time_s", "valid_bpc")


def epoch_points(history: pd.DataFrame, run_ids) -> pd.DataFrame:
    """``run_id, train_time_s, valid_bpc``: one row per evaluation of the runs ``run_ids`` with both values finite.

    ``history`` is the long frame ``run_id, metric, step, value, timestamp`` (:func:`dashboards.load.load_histories`),
    pivoted as every per-epoch view is (:func:`dashboards.load.pivot_epochs`)."""
    wide = pivot_epochs(history, run_ids).reindex(columns=["run_id", *POINTS])
    finite = np.isfinite(wide[list(POINTS)].astype(float)).all(axis=1)
    return wide.loc[finite].reset_index(drop=True)


def value_at(times: np.ndarray, bpc: np.ndarray, t_star: float) -> float:
    """Valid BPC at ``t_star`` by linear interpolation; NaN before the first evaluation (or without any)."""
    if not np.isfinite(t_star) or len(times) == 0:
        return math.nan
    order = np.argsort(times, kind="stable")
    times, bpc = np.asarray(times, float)[order], np.asarray(bpc, float)[order]
    if t_star < times[0]:
        return math.nan
    return float(np.interp(t_star, times, bpc))


def add_equal_time(aset: AnalysisSet, history: pd.DataFrame) -> AnalysisSet:
    """``aset`` with two columns on ``selected``: ``equal_time_s`` (T* of the run's protocol and budget) and
    ``valid_bpc_equal_time`` (its valid BPC at T*). Unchanged when none of the selected runs has an epoch history
    with training time and valid BPC (nothing to say at equal time)."""
    selected = aset.selected.drop(columns=[EQUAL_TIME, EQUAL_TIME_S], errors="ignore")
    points = epoch_points(history, selected["run_id"]) if len(selected) else pd.DataFrame()
    if points.empty:
        return dataclasses.replace(aset, selected=selected)
    by_run = {run_id: (g["train_time_s"].to_numpy(float), g["valid_bpc"].to_numpy(float))
              for run_id, g in points.groupby("run_id", sort=False)}
    final = selected["run_id"].map({run_id: times.max() for run_id, (times, _) in by_run.items()})
    t_star = pd.Series(math.nan, index=selected.index)
    for _, group in selected.groupby(["protocol", "budget"], dropna=False, sort=False):
        t_star[group.index] = final[group.index].min()  # NaN-skipping: a run without history sets nothing
    values = [value_at(*by_run.get(run_id, (np.array([]), np.array([]))), t)
              for run_id, t in zip(selected["run_id"], t_star, strict=True)]
    return dataclasses.replace(aset, selected=selected.assign(**{EQUAL_TIME_S: t_star.astype(float),
                                                                  EQUAL_TIME: np.asarray(values, dtype=float)}))
