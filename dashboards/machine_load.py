"""Did a run have its CPUs to itself? Only then are its times (tokens/s, training time, valid BPC at equal
training time T*) a measurement of the model rather than of the machine's other tenants.

Per run, from the record (``study.record.layout``):

- ``cpu_share``: process CPU seconds spent in training steps / (training seconds x torch threads),
  cumulative, logged per epoch. Near 1 when every torch thread ran whenever the run trained; 0.5 when the
  threads got half of their cores. The run's value here is its *lowest* epoch value (the cumulative share
  up to any epoch, so a crowded start is not averaged away by a quiet end).
- ``load_avg_max`` / ``nlstm.cpus``: the node's highest 1-minute load average at an epoch end (final
  metric; else the highest ``load_avg_1m``) per logical CPU.

A run *had its CPUs* when ``cpu_share >= CPU_SHARE_MIN`` and ``load per CPU <= LOAD_PER_CPU_MAX``
(docs/report.md justifies the thresholds). A group of runs (an arm, or the two arms of a comparison) is a
measurement only if every run had its CPUs; it is "shared" if any recorded run did not; "not recorded"
if some run lacks cpu_share, load_avg_max or nlstm.cpus and none failed the rule (records made before
these were logged).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dashboards.load import pivot_epochs

CPU_SHARE_MIN = 0.8
LOAD_PER_CPU_MAX = 1.25
MEASURED, SHARED, NOT_RECORDED = "measured", "shared", "not recorded"
RUN_COLUMNS = ("cpu_share_min", "load_per_cpu_max")


def run_load(trials: pd.DataFrame, histories: pd.DataFrame) -> pd.DataFrame:
    """``run_id, cpu_share_min, load_per_cpu_max`` per run of ``trials`` (NaN where not recorded)."""
    out = pd.DataFrame({"run_id": trials["run_id"].to_numpy()})
    wide = pivot_epochs(histories, trials["run_id"]) if len(trials) else pd.DataFrame()
    share, load_1m = pd.Series(dtype=float), pd.Series(dtype=float)
    if not wide.empty:
        if "cpu_share" in wide:
            share = pd.to_numeric(wide["cpu_share"], errors="coerce").groupby(wide["run_id"]).min()
        if "load_avg_1m" in wide:
            load_1m = pd.to_numeric(wide["load_avg_1m"], errors="coerce").groupby(wide["run_id"]).max()
    final_share = pd.to_numeric(trials.get("cpu_share", pd.Series(math.nan, index=trials.index)), errors="coerce")
    out["cpu_share_min"] = out["run_id"].map(share).astype(float).fillna(
        pd.Series(final_share.to_numpy(), index=out.index))
    load_max = pd.to_numeric(trials.get("load_avg_max", pd.Series(math.nan, index=trials.index)), errors="coerce")
    load_max = pd.Series(load_max.to_numpy(), index=out.index).fillna(out["run_id"].map(load_1m).astype(float))
    cpus = pd.to_numeric(trials.get("cpus", pd.Series(math.nan, index=trials.index)), errors="coerce").astype(float)
    cpus = pd.Series(cpus.to_numpy(), index=out.index)
    out["load_per_cpu_max"] = load_max / cpus.where(cpus > 0)
    return out


def add_machine_load(aset, histories: pd.DataFrame):
    """``aset`` (a :class:`dashboards.stats.AnalysisSet`) with :data:`RUN_COLUMNS` on ``selected``."""
    selected = aset.selected.drop(columns=list(RUN_COLUMNS), errors="ignore")
    if selected.empty:
        return dataclasses.replace(aset, selected=selected.assign(**{c: pd.Series(dtype=float) for c in RUN_COLUMNS}))
    loads = run_load(selected, histories).drop_duplicates("run_id")
    return dataclasses.replace(aset, selected=selected.merge(loads, on="run_id", how="left"))


@dataclass(frozen=True)
class LoadCheck:
    """Whether a group of runs had their CPUs: :data:`MEASURED`, :data:`SHARED` or :data:`NOT_RECORDED`."""

    status: str
    n_runs: int
    cpu_share_min: float  # over the group's recorded runs
    cpu_share_max: float
    load_per_cpu_max: float

    @property
    def measured(self) -> bool:
        return self.status == MEASURED

    def cell(self) -> str:
        """The report's short cell: ``yes``, ``no: shared CPUs (cpu_share 0.40-0.60)`` or ``not recorded``."""
        if self.status == MEASURED:
            return "yes"
        if self.status == SHARED:
            return f"no: shared CPUs ({self._numbers()})"
        return "not recorded"

    def sentence(self) -> str:
        """One sentence for a paragraph about time-based numbers."""
        if self.status == MEASURED:
            return (f"The runs had their CPUs ({self._numbers()}; rule: cpu_share >= {CPU_SHARE_MIN:g} and load per "
                    f"CPU <= {LOAD_PER_CPU_MAX:g}), so these times are a measurement.")
        if self.status == SHARED:
            return (f"Not a measurement: trials shared their CPUs ({self._numbers()}; a measurement needs cpu_share "
                    f">= {CPU_SHARE_MIN:g} and load per CPU <= {LOAD_PER_CPU_MAX:g}), so the times say nothing "
                    "about the models' speed.")
        return ("Machine load not recorded (cpu_share, load_avg_max, nlstm.cpus), so whether these times are a "
                "measurement of the models or of a shared machine cannot be told.")

    def _numbers(self) -> str:
        share = (f"{self.cpu_share_min:.2f}" if self.cpu_share_max - self.cpu_share_min < 0.005
                 else f"{self.cpu_share_min:.2f}-{self.cpu_share_max:.2f}")
        load = f"; load per CPU up to {self.load_per_cpu_max:.2f}" if np.isfinite(self.load_per_cpu_max) else ""
        return f"cpu_share {share}{load}"


def check_load(runs: pd.DataFrame) -> LoadCheck:
    """The rule over ``runs`` (rows with :data:`RUN_COLUMNS`, e.g. an arm's selected runs)."""
    n = len(runs)
    if n == 0 or not set(RUN_COLUMNS) <= set(runs.columns):
        return LoadCheck(NOT_RECORDED, n, math.nan, math.nan, math.nan)
    share = pd.to_numeric(runs["cpu_share_min"], errors="coerce").astype(float)
    load = pd.to_numeric(runs["load_per_cpu_max"], errors="coerce").astype(float)
    bad = (share < CPU_SHARE_MIN) | (load > LOAD_PER_CPU_MAX)
    recorded = share.notna() & load.notna()
    shares = share.dropna()
    lo, hi = (float(shares.min()), float(shares.max())) if len(shares) else (math.nan, math.nan)
    top = float(load.max()) if load.notna().any() else math.nan
    if bad.any():
        return LoadCheck(SHARED, n, lo, hi, top)
    if recorded.all():
        return LoadCheck(MEASURED, n, lo, hi, top)
    return LoadCheck(NOT_RECORDED, n, lo, hi, top)
