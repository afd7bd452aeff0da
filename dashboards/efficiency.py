"""How much of a study's wall time its trial slots spent training.

efficiency = sum of the trials' training time / (the study's wall time x trial slots). The
rest is start-up (Ray, trial processes, corpus), evaluation, MLflow writes, checkpoints and slots
left idle. A low value says the study's shape (many short trials, few of them at a time) costs
more than its models do; it is not a statement about any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from study.record.layout import TRIAL_SLOTS_TAG


@dataclass(frozen=True)
class Efficiency:
    train_s: float
    wall_s: float
    slots: int

    @property
    def value(self) -> float:
        return self.train_s / (self.wall_s * self.slots)

    def sentence(self) -> str:
        return (f"Efficiency {self.value:.2f}: {self.train_s:,.0f} s of trial training in {self.wall_s:,.0f} s of "
                f"wall time on {self.slots} trial slot{'s' if self.slots > 1 else ''} (the rest is start-up, "
                "evaluation, records, checkpoints and idle slots).")


def study_efficiency(parent: dict | None, trials: pd.DataFrame) -> Efficiency | None:
    """None while the study runs, or when its slots or times were not recorded."""
    if not parent or parent.get("status") == "RUNNING" or "train_time_s" not in trials:
        return None
    start, end = parent.get("start_time"), parent.get("end_time")
    slots = parent.get("tags", {}).get(TRIAL_SLOTS_TAG)
    if start is None or end is None or pd.isna(start) or pd.isna(end) or not slots:
        return None
    wall_s = (end - start).total_seconds()
    if wall_s <= 0:
        return None
    return Efficiency(float(trials["train_time_s"].fillna(0).sum()), wall_s, int(slots))
