"""The study efficiency the report states: trial training time over wall time x trial slots."""

from __future__ import annotations

import pandas as pd
import pytest

from dashboards.efficiency import study_efficiency

START = pd.Timestamp("2026-12-01 10:00:00")


def parent(seconds: float, slots: str | None = "2", status: str = "FINISHED") -> dict:
    return {"status": status, "start_time": START, "end_time": START + pd.Timedelta(seconds=seconds),
            "tags": {"nlstm.trial_slots": slots} if slots else {}}


def test_efficiency_is_training_time_over_wall_time_times_slots():
    trials = pd.DataFrame({"train_time_s": [10.0, 20.0, None, 30.0]})  # a failed trial without a time counts 0
    e = study_efficiency(parent(60.0), trials)
    assert (e.train_s, e.wall_s, e.slots) == (60.0, 60.0, 2) and e.value == pytest.approx(0.5)
    assert e.sentence().startswith("Efficiency 0.50: 60 s of trial training in 60 s of wall time on 2 trial slots")


def test_no_efficiency_while_running_or_without_slots():
    trials = pd.DataFrame({"train_time_s": [10.0]})
    assert study_efficiency(parent(60.0, status="RUNNING"), trials) is None
    assert study_efficiency(parent(60.0, slots=None), trials) is None
    assert study_efficiency(None, trials) is None
