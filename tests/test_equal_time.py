"""Valid BPC at equal training time (issue 10): T*, the interpolation, and the comparison the report makes of it.

Unit tests use hand-built frames; the report-level tests write a tiny MLflow store (sqlite, no Ray, no training)
with the helpers of ``tests/test_report_statistics.py``, whose runs log ``train_time_s = e * seconds_per_epoch``
and ``valid_bpc = valid + 0.5 * (epochs - e)`` after epoch ``e``. Expected numbers are computed by hand here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_report_statistics import STUDY, FakeRun, arm, make_store, noise, render

from dashboards.equal_time import add_equal_time
from dashboards.stats import EQUAL_TIME, EQUAL_TIME_S, AnalysisSet, analysis_set, arm_table, paired_comparisons
from dashboards.tables import tidy_arms

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")


def history(points: dict[str, list[tuple[float, float]]]) -> pd.DataFrame:
    """The long per-epoch frame of ``load_histories`` for runs evaluated at ``(train_time_s, valid_bpc)`` points."""
    rows = []
    for run_id, evaluations in points.items():
        for step, (seconds, bpc) in enumerate(evaluations, start=1):
            rows += [(run_id, "train_time_s", step, seconds, step), (run_id, "valid_bpc", step, bpc, step),
                     (run_id, "tokens_seen", step, 1e4 * step, step)]
    return pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])


def selected(run_ids: list[str], budget: float = 20_000, protocol: str = "ablation") -> pd.DataFrame:
    return pd.DataFrame({"run_id": run_ids, "protocol": protocol, "budget": budget, "family": "nlstm-d2",
                         "seed": range(1, len(run_ids) + 1)})


def aset_of(sel: pd.DataFrame) -> AnalysisSet:
    return AnalysisSet(trials=sel, runs=sel, selected=sel, phases=["ablation"], note="")


def test_t_star_is_the_shortest_final_time_and_the_bpc_is_interpolated_there():
    # a: evaluated at 10/20/30 s (BPC 3/2/1.5); b ends at 25 s, so T* = 25 and a's BPC there is 1.75.
    hist = history({"a": [(10, 3.0), (20, 2.0), (30, 1.5)], "b": [(5, 4.0), (15, 2.5), (25, 2.2)],
                    "c": [(26, 2.4), (40, 1.9)]})  # c's first evaluation comes after T*: NaN, not extrapolated
    out = add_equal_time(aset_of(selected(["a", "b", "c"])), hist).selected.set_index("run_id")
    assert out[EQUAL_TIME_S].tolist() == [25.0, 25.0, 25.0]
    assert out.loc["a", EQUAL_TIME] == pytest.approx(1.75)
    assert out.loc["b", EQUAL_TIME] == pytest.approx(2.2)  # the shortest run: its last evaluation
    assert math.isnan(out.loc["c", EQUAL_TIME])


def test_t_star_is_per_budget_and_a_run_without_history_sets_nothing():
    sel = pd.concat([selected(["a", "b"], budget=20_000), selected(["c", "d"], budget=50_000)], ignore_index=True)
    hist = history({"a": [(10, 3.0), (20, 2.0)], "b": [(8, 3.0), (16, 2.0)],  # 20k: T* = 16
                    "c": [(30, 2.0), (60, 1.0)]})  # 50k: d has no history, so c alone sets T* = 60
    out = add_equal_time(aset_of(sel), hist).selected.set_index("run_id")
    assert out[EQUAL_TIME_S].to_dict() == {"a": 16.0, "b": 16.0, "c": 60.0, "d": 60.0}
    assert out.loc["a", EQUAL_TIME] == pytest.approx(3.0 - 0.6)  # 10 s: 3.0, 20 s: 2.0; 16 s is 60 % of the way
    assert out.loc["c", EQUAL_TIME] == pytest.approx(1.0) and math.isnan(out.loc["d", EQUAL_TIME])


def test_without_history_there_is_no_equal_time_metric():
    sel = selected(["a", "b"]).assign(arch="nlstm", depth=2, outcome="learned", best_valid_bpc=1.5, test_bpc=1.5,
                                      num_params=2e4, tokens_per_s=1e3, train_time_s=10.0, config_hash="x",
                                      n_configs=1, config_not_learned=0)
    out = add_equal_time(aset_of(sel), history({}))
    assert EQUAL_TIME not in out.selected and EQUAL_TIME_S not in out.selected
    assert set(tidy_arms(arm_table(out))["split"]) == {"valid", "test"}


# ---------------------------------------------------------------------------- through the report
@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """An initialised, empty MLflow sqlite file, copied into each test's store (as in test_report_statistics)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def two_families(nested_seconds: float = 10.0, stacked_seconds: float = 8.0, epochs: int = 4) -> list[FakeRun]:
    runs = [FakeRun("ablation", "nlstm", 2, s, valid=1.40 + noise(s), test=1.41, epochs=epochs,
                    seconds_per_epoch=nested_seconds) for s in (1, 2, 3)]
    runs += [FakeRun("ablation", "stacked", 2, s, valid=1.60 + noise(s + 10), test=1.61, epochs=epochs,
                     seconds_per_epoch=stacked_seconds) for s in (1, 2, 3)]
    return runs


def test_the_equal_time_comparison_is_paired_by_seed_and_a_run_that_did_not_learn_sets_no_t_star(tmp_path, template):
    runs = two_families()  # nested evaluated at 10/20/30/40 s, stacked at 8/16/24/32 s: T* = 32 s
    # seed 4 of nested did not learn (BPC far above chance) after 4 s: were it counted, T* would be 4 s
    runs.append(FakeRun("ablation", "nlstm", 2, 4, valid=300.0, test=300.0, seconds_per_epoch=1.0))
    md, arms, comparisons = render(tmp_path, runs, template)
    # nested at 32 s: between epoch 3 (valid + 0.5, at 30 s) and epoch 4 (valid, at 40 s): valid + 0.4
    nested = [r.valid + 0.4 for r in runs if r.arch == "nlstm" and r.seed < 4]
    stacked = [r.valid for r in runs if r.arch == "stacked"]  # 32 s is their last evaluation
    row = comparisons[comparisons["split"] == "valid_equal_time"]
    assert len(row) == 1
    row = row.iloc[0]
    assert row["equal_time_s"] == pytest.approx(32.0) and row["test"] == "paired t-test" and row["n_pairs"] == 3
    diff = np.subtract(nested, stacked)
    assert row["nested_minus_other_bpc_mean"] == pytest.approx(diff.mean(), rel=1e-9)
    assert row["p_value"] == pytest.approx(stats.ttest_rel(nested, stacked).pvalue, rel=1e-9)
    at_t = arm(arms, "nlstm-d2", "valid_equal_time")
    assert at_t["bpc_mean"] == pytest.approx(np.mean(nested)) and at_t["equal_time_s"] == pytest.approx(32.0)
    assert at_t["n_seeds"] == 3 and at_t["n_no_eval_before_equal_time"] == 0
    assert "At equal training time (T* = 32.0 s, the shortest run's training time at this budget, 20k)" in md
    section = md.split("At equal training time", 1)[1].split("\n## ", 1)[0]
    assert row["verdict"] in section  # at 32 s nested (valid + 0.4 = 1.8) is behind stacked (1.6)
    assert row["verdict"].startswith("stacked-d2 has a lower valid BPC at equal training time than nlstm-d2")
    assert "Dashed vertical line: T* (32.0 s)" in md  # figure 3's caption names the line it draws
    assert "Equal training time: per protocol and budget, T* is the smallest final cumulative training time" in md


def test_a_single_evaluation_per_run_is_counted_not_extrapolated(tmp_path, template):
    runs = two_families(epochs=1)  # one evaluation each, at the end: nested at 10 s, stacked at 8 s = T*
    md, arms, comparisons = render(tmp_path, runs, template)
    nested = arm(arms, "nlstm-d2", "valid_equal_time")
    assert nested["n_seeds"] == 0 and nested["n_no_eval_before_equal_time"] == 3 and math.isnan(nested["bpc_mean"])
    assert arm(arms, "stacked-d2", "valid_equal_time")["n_seeds"] == 3
    assert "the equal-time view needs several evaluations per run): nlstm-d2 3." in md
    row = comparisons[comparisons["split"] == "valid_equal_time"].iloc[0]
    assert row["n_seeds_nested"] == 0 and math.isnan(row["nested_minus_other_bpc_mean"])


def test_runs_without_history_have_no_equal_time_rows_or_paragraph(tmp_path, template):
    from dashboards import load_study
    from dashboards.report import build_report, render_markdown

    data = load_study(STUDY, make_store(tmp_path, two_families(), template=template))
    data = dataclasses.replace(data, histories=data.histories.iloc[0:0])
    doc, frames = build_report(data)
    assert "valid_equal_time" not in set(frames["arms"]["split"]) | set(frames["comparisons"]["split"])
    assert "At equal training time" not in render_markdown(doc) and "T*" not in render_markdown(doc)
    aset = add_equal_time(analysis_set(data.trials), data.histories)
    assert EQUAL_TIME not in aset.selected and not any(c.metric == EQUAL_TIME for c in paired_comparisons(aset))
