"""The next record's fields in the report: stop reasons, outer candidate, code versions, machine load, the
search's tuning budget and fidelity; and the statistics built on them (expected best validation BPC against
tuning trials, probability of improvement), the interval rule, dodged figures and per-family importance.

Unit tests check each estimator against hand-computed values or an independent brute force. The report-level
tests write small MLflow stores with the helpers of ``tests/test_report_statistics.py`` (sqlite, no Ray, no
training), once in the layout of the next record (tags ``nlstm.stop_reason``, ``nlstm.code_version``,
``nlstm.cpus``, metrics ``cpu_share``, ``load_avg_1m``, ``load_avg_max``; parent tags
``nlstm.search_trials_per_family``, ``nlstm.search_fidelity``) and once as older records without them.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_report_statistics import STUDY, FakeRun, analysed, make_store, noise, render

from study.record.layout import (
    CANDIDATE_TAG,
    CODE_VERSION_TAG,
    CPUS_TAG,
    FAMILY_TAG,
    SEARCH_BUDGET_TAG,
    SEARCH_FIDELITY_TAG,
    STOP_REASON_TAG,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "report.md"
VERSION = "0.2.0+g1a2b3c4"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """An initialised, empty MLflow sqlite file, copied into each test's store (as in test_report_statistics)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def brute_force_expected_min(values, n: int) -> float:
    """The mean of min(draws) over every one of the N^n equally likely ordered draws: the definition itself."""
    return float(np.mean([min(draws) for draws in itertools.product(values, repeat=n)]))


def tables(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / "report" / "tables" / f"{name}.csv")


# ---------------------------------------------------------------------------- expected best (Dodge et al. 2019)
def test_expected_min_of_three_values_by_hand():
    from dashboards.expected_best import expected_min

    # values 1, 2, 3: n = 1 is the mean 2; n = 2: min is 1 in 5 of the 9 ordered pairs, 2 in 3, 3 in 1 -> 14/9;
    # n = 3: 1 in 27 - 8 = 19 triples, 2 in 8 - 1 = 7, 3 in 1 -> 36/27 = 4/3. The order of the input is irrelevant.
    assert expected_min([3.0, 1.0, 2.0]) == pytest.approx([2.0, 14 / 9, 4 / 3], abs=1e-12)
    assert expected_min([2.0]) == pytest.approx([2.0])


def test_expected_min_is_the_definition_and_not_the_max_or_another_n():
    """Against the brute force over all N^n draws (ties included): a max, or n off by one, would not match."""
    from dashboards.expected_best import expected_min

    values = [1.71, 1.52, 1.90, 1.52, 2.40]
    curve = expected_min(values)
    assert len(curve) == len(values)
    for n in range(1, len(values) + 1):
        assert curve[n - 1] == pytest.approx(brute_force_expected_min(values, n), abs=1e-12), n
    assert curve[0] == pytest.approx(np.mean(values))  # n = 1: one draw, the mean
    assert np.all(np.diff(curve) <= 0) and curve[-1] > min(values)  # more trials never hurt; N draws may repeat
    maxes = [float(np.mean([max(d) for d in itertools.product(values, repeat=2)]))]
    assert curve[1] != pytest.approx(maxes[0])


def test_the_bootstrap_band_is_seeded_and_covers_the_estimate():
    from dashboards.expected_best import MIN_TRIALS, expected_min, expected_min_band

    values = [1.71, 1.52, 1.90, 1.55, 2.40, 1.62, 1.80]
    low, high = expected_min_band(values)
    again_low, again_high = expected_min_band(values)
    assert np.array_equal(low, again_low) and np.array_equal(high, again_high)  # seeded: a report is reproducible
    other_low, _ = expected_min_band(values, seed=1)
    assert not np.array_equal(low, other_low)  # ... and the seed is what fixes it
    curve = expected_min(values)
    assert np.all(low <= curve) and np.all(curve <= high) and np.all(low < high)
    assert np.all(low >= min(values)) and np.all(high <= max(values))  # resamples hold only observed values
    assert np.isnan(expected_min_band(values[: MIN_TRIALS - 1])[0]).all()  # too few trials: no band
    assert expected_min_band([1.5, 1.5, 1.5])[0] == pytest.approx([1.5, 1.5, 1.5])


def test_the_ranking_verdict_names_where_the_order_holds_and_where_bands_overlap():
    from dashboards.expected_best import expected_best_table, ranking_verdict

    # nlstm-d2 is erratic (one great trial, the rest poor): worse on average, better with enough trials
    erratic, steady = [1.0, 3.0, 3.0, 3.0], [1.8, 1.9, 2.0, 2.1]
    trials = pd.DataFrame({"phase": "search", "state": "completed", "family": ["nlstm-d2"] * 4 + ["stacked-d2"] * 4,
                           "best_valid_bpc": erratic + steady})
    table = expected_best_table(trials)
    assert list(table.columns) == ["family", "n_trials", "expected_best_valid_bpc", "band_low", "band_high"]
    by = table.set_index(["family", "n_trials"])["expected_best_valid_bpc"]
    # by hand: erratic at n = 4 is 1 * (1 - (3/4)^4) + 3 * (3/4)^4 = 1 + 2 * 81/256; steady at n = 1 is 1.95
    assert by["nlstm-d2", 4] == pytest.approx(1 + 2 * 81 / 256) and by["stacked-d2", 1] == pytest.approx(1.95)
    order = [n for n in range(1, 5) if by["nlstm-d2", n] < by["stacked-d2", n]]
    first = min(order)
    assert order == list(range(first, 5)) and first > 1
    text = ranking_verdict(table)
    assert "at n = 4 tuning trials" in text and "The order nlstm-d2 < stacked-d2 holds" in text
    assert f"from n = {first} to 4; with fewer trials it differs (at n = {first - 1}: stacked-d2 < nlstm-d2)" in text
    assert "nlstm-d2 and stacked-d2 overlap at" in text


# ---------------------------------------------------------------------------- probability of improvement
def test_probability_of_improvement_by_hand():
    from dashboards.improvement import probability_of_improvement, wins

    nested = pd.Series([1.40, 1.50, 1.45, 1.30], index=[1, 2, 3, 4])
    other = pd.Series([1.45, 1.48, 1.45, 1.35], index=[1, 2, 3, 4])
    assert list(wins(nested, other)) == [1.0, 0.0, 0.5, 1.0]  # lower is better; a tie counts half
    p = probability_of_improvement(nested, other)
    assert p.share == pytest.approx(2.5 / 4) and (p.n_pairs, p.n_unpaired) == (4, 0)
    assert p.low <= p.share <= p.high and 0 <= p.low and p.high <= 1
    assert (p.low * 8) == pytest.approx(round(p.low * 8)) and (p.high * 8) == pytest.approx(round(p.high * 8))
    assert probability_of_improvement(nested, other) == p  # seeded
    # seeds 4 and 5 have no partner: left out and counted; two pairs give a share but no interval
    q = probability_of_improvement(nested[[1, 2, 4]], pd.Series([1.45, 1.48, 1.0], index=[1, 2, 5]))
    assert (q.share, q.n_pairs, q.n_unpaired) == (0.5, 2, 2) and math.isnan(q.low)
    assert q.text() == "0.50 (2 pairs; no interval, 2 unpaired seeds left out)"
    none = probability_of_improvement(nested[[1]], other[[2]])
    assert math.isnan(none.share) and none.text() == "n/a"


# ---------------------------------------------------------------------------- stop reasons
def test_stop_reasons_are_recorded_or_derived_only_where_certain():
    from dashboards.stop_reason import derive_stop_reason

    no_patience = {"epochs": "4", "patience": "None"}
    assert derive_stop_reason("plateau", "completed", None, {}, 2) == ("plateau", "recorded")
    assert derive_stop_reason(None, "pruned", None, {}, 1) == ("pruned", "derived")
    assert derive_stop_reason(None, "interrupted", None, {}, 1) == ("interrupted", "derived")
    assert derive_stop_reason(None, "failed", "diverged: loss nan", {}, None) == ("diverged", "derived")
    assert derive_stop_reason(None, "failed", "ModuleNotFoundError", {}, None) == ("failed", "derived")
    assert derive_stop_reason(None, "completed", None, no_patience, 4.0) == ("max_epochs", "derived")
    # patience set: every epoch run may still be a plateau reached on the last one; fewer epochs: plateau or time
    assert derive_stop_reason(None, "completed", None, {"epochs": "4", "patience": "2"}, 4.0) == ("", "")
    assert derive_stop_reason(None, "completed", None, no_patience, 3.0) == ("", "")
    assert derive_stop_reason(None, "completed", None, {"epochs": "4"}, 4.0) == ("", "")  # patience not recorded


def test_the_ending_sentence_says_ends_only_when_every_run_stopped_at_its_plateau_and_tuning_was_equal():
    from dashboards.stop_reason import ending_sentence

    plateau = Counter({"plateau": 3})
    assert ending_sentence("nlstm-d2", "stacked-d2", False, plateau, plateau, "test BPC") == (
        "Every run of both arms stopped at its plateau (6 runs) and both families were tuned with the same budget, "
        "so nlstm-d2 ends worse than stacked-d2.")
    untuned = ending_sentence("nlstm-d2", "stacked-d2", False, plateau, plateau, "test BPC",
                              untuned="the record has no search trials of nlstm-d2")
    assert untuned == ("Every run of both arms stopped at its plateau (6 runs), but the record has no search trials "
                       "of nlstm-d2, so this says nlstm-d2 settles worse than stacked-d2 at the configurations "
                       "compared, not that it ends worse once each family is tuned.")
    mixed = ending_sentence("nlstm-d2", "stacked-d2", True, plateau, Counter({"max_epochs": 2, "plateau": 1}),
                            "test BPC")
    assert mixed.startswith("Not every run stopped at its plateau (2 of 6 runs stopped at max_epochs, 4 at their "
                            "plateau), so this says nlstm-d2 learns faster than stacked-d2 within the training budget")
    old = ending_sentence("nlstm-d2", "stacked-d2", False, Counter({"not recorded": 3}),
                          Counter({"not recorded": 3}), "test BPC")
    assert "No stop reason is recorded for these 6 runs" in old and "nlstm-d2 learns more slowly" in old


def test_tuning_gap_needs_the_evaluate_phase_and_equal_ended_search_trials():
    from dashboards.stop_reason import tuning_gap

    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {"nlstm-d2": 16, "stacked-d2": 16}) == ""
    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {"nlstm-d2": 16, "stacked-d2": 15}) == (
        "unequal tuning budgets (search trials: nlstm-d2 16, stacked-d2 15)")
    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {"stacked-d2": 16}) == (
        "the record has no search trials of nlstm-d2")
    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {}) == (
        "the record has no search trials of nlstm-d2 and stacked-d2")
    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {"nlstm-d2": 16, "stacked-d2": 16},
                      {"nlstm-d2": 15, "stacked-d2": 16}) == (
        "unequal tuning budgets (16 search trials each, but distinct configurations: nlstm-d2 15, stacked-d2 16)")
    assert tuning_gap("evaluate", "nlstm-d2", "stacked-d2", {"nlstm-d2": 16, "stacked-d2": 16},
                      {"nlstm-d2": 16, "stacked-d2": 16}) == ""
    ablation = tuning_gap("ablation, dependency_length 20", "nlstm-d2", "single-d1", {"nlstm-d2": 4, "single-d1": 4})
    assert ablation == ('the "ablation, dependency_length 20" runs use configurations the study set, not ones tuned '
                        "per family")


def test_ended_search_trials_leave_out_running_and_superseded_runs():
    from dashboards.search_trials import search_trials

    trials = pd.DataFrame({
        "phase": ["search"] * 6 + ["evaluate"],
        "family": ["nlstm-d2", "nlstm-d2", "nlstm-d2", "nlstm-d2", "stacked-d2", "stacked-d2", "stacked-d2"],
        "state": ["completed", "pruned", "running", "failed", "failed", "completed", "completed"],
        "fail_reason": [None, None, None, "superseded: checkpoint lost", "diverged: nan", None, None],
        "best_valid_bpc": [1.5, 2.0, math.nan, math.nan, math.nan, 1.6, 1.4],
        "config_hash": ["a", "b", "c", "a", "d", "d", None]})
    found = search_trials(trials)
    assert found.ended == {"nlstm-d2": 2, "stacked-d2": 2}  # nested: completed + pruned; stacked: failed + completed
    assert found.total.to_dict() == {"nlstm-d2": 3, "stacked-d2": 2}
    assert found.distinct.to_dict() == {"nlstm-d2": 2, "stacked-d2": 1}  # stacked's two trials: one configuration
    assert found.repeated == {"stacked-d2": 1}
    trials.loc[5, "config_hash"] = None  # not recorded: counted as a configuration of its own
    assert search_trials(trials).distinct.to_dict() == {"nlstm-d2": 2, "stacked-d2": 2}


# ---------------------------------------------------------------------------- machine load
def test_the_machine_load_rule_and_its_edges():
    from dashboards.machine_load import MEASURED, NOT_RECORDED, SHARED, check_load

    def rows(share, load):
        return pd.DataFrame({"cpu_share_min": share, "load_per_cpu_max": load})

    assert check_load(rows([0.8, 0.95], [1.25, 0.5])).status == MEASURED  # the thresholds themselves pass
    assert check_load(rows([0.79, 0.95], [1.0, 1.0])).status == SHARED
    assert check_load(rows([0.9, 0.95], [1.26, 1.0])).status == SHARED
    assert check_load(rows([0.9, math.nan], [1.0, 1.0])).status == NOT_RECORDED  # one run predates the record
    assert check_load(rows([0.5, math.nan], [1.0, math.nan])).status == SHARED  # one recorded run shared: enough
    assert check_load(rows([0.4, 0.6], [2.1, 1.0])).cell() == "no: shared CPUs (cpu_share 0.40-0.60; load per CPU " \
                                                               "up to 2.10)"


# ---------------------------------------------------------------------------- the next record, through the report
def new_record_runs() -> list[FakeRun]:
    """Evaluate: nlstm-d2 and stacked-d2, 4 seeds, every run at its plateau on a quiet machine, one code version.
    Search: nlstm-d2 6 completed + 2 pruned, stacked-d2 5 completed + 1 failed + 2 pruned: 8 trials each, the
    same tuning budget."""
    record = {STOP_REASON_TAG: "plateau", CODE_VERSION_TAG: VERSION, CPUS_TAG: "2"}
    quiet = {"cpu_share": 0.95, "load_avg_1m": 1.0, "lr": 2.5e-4}  # lr: as the plateau schedule lowered it
    nested_test, stacked_test = [1.40, 1.50, 1.45, 1.30], [1.45, 1.48, 1.45, 1.35]  # P(nested better) = 2.5 / 4
    runs = [FakeRun("evaluate", arch, 2, s, valid=valid + noise(s + k), test=test[s - 1], tags=record,
                    epoch_metrics=quiet, metrics={"load_avg_max": 2.0})
            for k, (arch, valid, test) in enumerate((("nlstm", 1.40, nested_test), ("stacked", 1.60, stacked_test)))
            for s in (1, 2, 3, 4)]
    search = {"nlstm": [1.62, 1.55, 1.71, 1.58, 1.90, 1.66], "stacked": [1.70, 1.52, 1.64, 1.61, 1.75]}
    for arch, values in search.items():
        runs += [FakeRun("search", arch, 2, 0, valid=v, lr=1e-3 * (i + 1), tags=record) for i, v in enumerate(values)]
    runs += [FakeRun("search", "nlstm", 2, 0, valid=2.5, lr=0.05 + i, state="pruned", epochs=1,
                     tags=record | {STOP_REASON_TAG: "pruned"}) for i in range(2)]
    runs += [FakeRun("search", "stacked", 2, 0, valid=math.nan, lr=0.9, state="failed", reason="diverged: nan")]
    runs += [FakeRun("search", "stacked", 2, 0, valid=2.6, lr=0.07 + i, state="pruned", epochs=1,
                     tags=record | {STOP_REASON_TAG: "pruned"}) for i in range(2)]
    return runs


FIDELITY = "4 epochs of 150 steps; no scheduler"


@pytest.fixture(scope="module")
def new_record(tmp_path_factory, template):
    root = tmp_path_factory.mktemp("new-record")
    runs = new_record_runs()
    md, arms, comparisons = render(root, runs, template,
                                   parent_tags={SEARCH_BUDGET_TAG: "8", SEARCH_FIDELITY_TAG: FIDELITY})
    return root, runs, md, arms, comparisons


def test_expected_best_table_and_the_tuning_budget_paragraph(new_record):
    root, runs, md, _, _ = new_record
    table = tables(root, "expected_best")
    assert list(table.columns) == ["family", "n_trials", "expected_best_valid_bpc", "band_low", "band_high"]
    assert table["n_trials"].dtype == np.int64
    for family, arch in (("nlstm-d2", "nlstm"), ("stacked-d2", "stacked")):
        values = [r.valid for r in runs if r.phase == "search" and r.arch == arch and r.state == "completed"]
        part = table[table["family"] == family]
        assert list(part["n_trials"]) == list(range(1, len(values) + 1))  # pruned and failed trials do not enter
        for n, got in zip(part["n_trials"], part["expected_best_valid_bpc"], strict=True):
            assert got == pytest.approx(brute_force_expected_min(values, n), abs=1e-12)
        assert (part["band_low"] <= part["expected_best_valid_bpc"]).all()
        assert (part["expected_best_valid_bpc"] <= part["band_high"]).all()
    section = md.split("## Tuning budget", 1)[1].split("\n## ", 1)[0]
    assert "Tuning budget: 8 trials per family (recorded; search trials found: nlstm-d2 8, stacked-d2 8)." in section
    assert f"Search fidelity: {FIDELITY}." in section
    assert "Entering the curves (completed at the search fidelity): nlstm-d2 6, stacked-d2 5." in section
    assert ("4 trials stopped early by the scheduler (pruned: nlstm-d2 2, stacked-d2 2) did not train to the search "
            "fidelity and are excluded") in section
    assert "1 failed trial (no finite BPC) excluded." in section
    assert "Ranking by expected best valid BPC at n = 5 tuning trials" in section
    assert "### Figure 8. Expected best validation BPC against tuning trials" in md
    assert "figures/fig8-expected-best.png" in md and (root / "report" / "figures" / "fig8-expected-best.png").is_file()
    assert "4 search trials stopped early by the scheduler (pruned) did not train to the search fidelity" in md


def test_probability_of_improvement_in_the_comparisons(new_record):
    _, _, md, _, comparisons = new_record
    row = comparisons[comparisons["split"] == "test"].iloc[0]
    assert row["p_nested_better"] == pytest.approx(0.625) and row["n_common_seeds"] == 4
    assert row["n_unpaired_seeds"] == 0
    assert row["p_nested_better_boot95_low"] <= 0.625 <= row["p_nested_better_boot95_high"]
    md_row = next(r for r in md.splitlines() if r.startswith("| evaluate |") and "| test BPC |" in r)
    assert f"| 0.62 [{row['p_nested_better_boot95_low']:.2f}, {row['p_nested_better_boot95_high']:.2f}] (4 pairs) |" \
           in md_row


def test_a_win_at_the_plateau_is_worded_as_ending_better(new_record):
    _, _, _, arms, comparisons = new_record
    valid = comparisons[comparisons["split"] == "valid"].iloc[0]["verdict"]
    assert valid.startswith("nlstm-d2 has a lower valid BPC than stacked-d2")
    assert ("Every run of both arms stopped at its plateau (8 runs) and both families were tuned with the same "
            "budget, so nlstm-d2 ends better than stacked-d2.") in valid
    assert "learns" not in valid
    assert set(arms["stop_reasons"]) == {"4 plateau"}


def test_unequal_tuning_budgets_say_settles_not_ends(tmp_path, template):
    """The same record with one stacked search trial fewer: every run still at its plateau, but nlstm-d2 had 8
    tuning trials and stacked-d2 7, so the win is where the models settle, not where they end."""
    runs = new_record_runs()
    runs.remove(next(r for r in runs if r.phase == "search" and r.arch == "stacked" and r.state == "pruned"))
    _, _, comparisons = render(tmp_path, runs, template,
                               parent_tags={SEARCH_BUDGET_TAG: "8", SEARCH_FIDELITY_TAG: FIDELITY})
    valid = comparisons[comparisons["split"] == "valid"].iloc[0]["verdict"]
    assert valid.startswith("nlstm-d2 has a lower valid BPC than stacked-d2")
    assert ("Every run of both arms stopped at its plateau (8 runs), but unequal tuning budgets (search trials: "
            "nlstm-d2 8, stacked-d2 7), so this says nlstm-d2 settles better than stacked-d2 at the configurations "
            "compared, not that it ends better once each family is tuned.") in valid
    assert "ends better than" not in valid


def test_times_of_runs_that_had_their_cpus_are_a_measurement(new_record):
    _, _, md, arms, comparisons = new_record
    assert set(arms["time_measurement"]) == {"measured"}
    assert (arms["cpu_share_min"] == 0.95).all() and (arms["load_per_cpu_max"] == 1.0).all()  # 2.0 / 2 CPUs
    timed = comparisons[comparisons["split"] == "valid_equal_time"].iloc[0]
    assert timed["time_measurement"] == "measured"
    assert comparisons.loc[comparisons["split"] != "valid_equal_time", "time_measurement"].isna().all()
    row = next(r for r in md.splitlines() if r.startswith("| evaluate | 20k | nlstm-d2 |"))
    assert "| yes |" in row
    assert "The runs had their CPUs (cpu_share 0.95; load per CPU up to 1.00" in md


def test_trials_csv_names_family_phase_candidate_stop_reason_and_code_version(new_record):
    root, runs, md, _, _ = new_record
    trials = tables(root, "trials")
    columns = list(trials.columns)
    assert {"family", "phase", "candidate_activation", "stop_reason", "stop_reason_source", "code_version"} <= set(
        columns)
    evaluate = trials[trials["phase"] == "evaluate"]
    assert (evaluate["stop_reason"] == "plateau").all() and (evaluate["stop_reason_source"] == "recorded").all()
    assert (evaluate["code_version"] == VERSION).all()
    assert (evaluate["lr"] == 2e-3).all()  # the configured learning rate, not the last epoch's 2.5e-4
    stacked = trials[trials["arch"] == "stacked"]
    assert (stacked["candidate_activation"] == "tanh").all()  # a stacked LSTM's candidate is tanh by definition
    pruned = trials[trials["status"] == "pruned"]
    assert len(pruned) == 4 and (pruned["stop_reason"] == "pruned").all()
    assert (pruned["stop_reason_source"] == "recorded").all()
    failed = trials[trials["status"] == "failed"]
    assert list(failed["stop_reason"]) == ["diverged"] and list(failed["stop_reason_source"]) == ["derived"]
    assert f"Code version: {VERSION} (every arm's runs)." in md


# ---------------------------------------------------------------------------- a crowded machine, mixed stops
def crowded_runs() -> list[FakeRun]:
    """nlstm-d2 seeds 1-4 at the plateau (one on another code version), stacked-d2 seeds 1, 2, 3, 5 of which two
    stopped at max_epochs; every run on a machine shared beyond its cores."""
    def record(stop: str, version: str = VERSION) -> dict:
        return {STOP_REASON_TAG: stop, CODE_VERSION_TAG: version, CPUS_TAG: "2"}

    nested = [FakeRun("evaluate", "nlstm", 2, s, valid=1.70 + noise(s), test=1.72 + noise(s + 3),
                      tags=record("plateau", VERSION if s < 4 else "0.2.0+g5d6e7f8.dirty"),
                      epoch_metrics={"cpu_share": 0.4, "load_avg_1m": 3.0}, metrics={"load_avg_max": 4.2})
              for s in (1, 2, 3, 4)]
    stacked = [FakeRun("evaluate", "stacked", 2, s, valid=1.50 + noise(s + 9), test=1.52 + noise(s + 11),
                       tags=record("max_epochs" if s in (1, 2) else "plateau"),
                       epoch_metrics={"cpu_share": 0.6, "load_avg_1m": 3.0}, metrics={"load_avg_max": 4.2})
               for s in (1, 2, 3, 5)]
    return nested + stacked


def test_a_crowded_machine_with_runs_cut_off_by_max_epochs(tmp_path, template):
    md, arms, comparisons = render(tmp_path, crowded_runs(), template)
    valid = comparisons[comparisons["split"] == "valid"].iloc[0]
    assert valid["test"] == "Welch's t-test"  # seed sets {1, 2, 3, 4} and {1, 2, 3, 5}
    # P(nested better) over the 3 common seeds (nested 1.70 vs stacked 1.50: never better), 2 seeds unpaired
    assert (valid["p_nested_better"], valid["n_common_seeds"], valid["n_unpaired_seeds"]) == (0.0, 3, 2)
    text = valid["verdict"]
    assert text.startswith("stacked-d2 has a lower valid BPC than nlstm-d2")
    assert ("Not every run stopped at its plateau (2 of 8 runs stopped at max_epochs, 6 at their plateau), so this "
            "says nlstm-d2 learns more slowly than stacked-d2 within the training budget, not where it ends") in text
    assert "ends worse" not in text
    # machine load: every time-based row is marked, never shown as a measurement
    assert set(arms["time_measurement"]) == {"shared"}
    timed = comparisons[comparisons["split"] == "valid_equal_time"].iloc[0]
    assert timed["time_measurement"] == "shared" and timed["cpu_share_min"] == 0.4 and timed["cpu_share_max"] == 0.6
    assert timed["load_per_cpu_max"] == pytest.approx(2.1)
    assert "Not a measurement: trials shared their CPUs (cpu_share 0.40-0.60; load per CPU up to 2.10" in md
    row = next(r for r in md.splitlines() if r.startswith("| evaluate | 20k | nlstm-d2 |"))
    assert "| no: shared CPUs (cpu_share 0.40; load per CPU up to 2.10) |" in row
    # code versions: the nested arm spans two
    nested = arms[(arms["family"] == "nlstm-d2") & (arms["split"] == "valid")].iloc[0]
    assert nested["code_versions"] == f"{VERSION} (3), 0.2.0+g5d6e7f8.dirty (1)"
    assert (f"Code versions: nlstm-d2 at 20k (evaluate) spans {VERSION} (3), 0.2.0+g5d6e7f8.dirty (1) (runs per "
            "version in brackets).") in md
    assert arms[arms["family"] == "stacked-d2"]["stop_reasons"].iloc[0] == "2 plateau, 2 max_epochs"


# ---------------------------------------------------------------------------- an older record
def test_an_older_record_says_not_recorded(tmp_path, template):
    """No tag of the next record: the report still works and says "not recorded" where it matters."""
    no_patience = {"patience": None}
    runs = [FakeRun("evaluate", arch, 2, s, valid=v + noise(s), test=v + noise(s + 1), extra=no_patience)
            for arch, v in (("nlstm", 1.7), ("stacked", 1.5)) for s in (1, 2, 3)]
    runs += [FakeRun("evaluate", "nlstm", 2, 4, valid=math.nan, state="failed", reason="ModuleNotFoundError: x")]
    runs += [FakeRun("search", arch, 2, 0, valid=1.6 + 0.05 * i, lr=1e-3 * (i + 1)) for arch in ("nlstm", "stacked")
             for i in range(3)]
    runs += [FakeRun("search", "nlstm", 2, 0, valid=2.0, lr=0.5, state="pruned", epochs=1)]
    md, arms, comparisons = render(tmp_path, runs, template)
    assert set(arms["time_measurement"]) == {"not recorded"} and set(arms["code_versions"]) == {"not recorded"}
    assert "Machine load not recorded (cpu_share, load_avg_max, nlstm.cpus)" in md
    assert "Code versions: not recorded (runs recorded before nlstm.code_version)." in md
    assert "Tuning budget per family not recorded (a study before per-family budgets); counted from the search " \
           "trials: nlstm-d2 4, stacked-d2 3. Search fidelity: not recorded." in md
    trials = tables(tmp_path, "trials")
    evaluate = trials[(trials["phase"] == "evaluate") & (trials["status"] == "completed")]
    # every epoch run with patience recorded as none: certainly max_epochs, derived
    assert (evaluate["stop_reason"] == "max_epochs").all() and (evaluate["stop_reason_source"] == "derived").all()
    search = trials[(trials["phase"] == "search") & (trials["status"] == "completed")]
    assert search["stop_reason"].isna().all()  # patience not recorded: not certain, blank
    assert list(trials.loc[trials["status"] == "pruned", "stop_reason"]) == ["pruned"]
    assert list(trials.loc[trials["status"] == "failed", "stop_reason"]) == ["failed"]
    assert trials["code_version"].isna().all()
    valid = comparisons[comparisons["split"] == "valid"].iloc[0]["verdict"]
    assert "learns more slowly than stacked-d2" in valid and "6 of 6 runs stopped at max_epochs" in valid
    # integer columns with blanks (epochs_run of the failed run): the documented one-line read gives integers
    assert trials["epochs_run"].isna().any() and trials["epochs_run"].dtype == float  # the plain read cannot
    typed = pd.read_csv(tmp_path / "report" / "tables" / "trials.csv", dtype_backend="numpy_nullable")
    for column in ("depth", "budget", "num_params", "seed", "epochs_run"):
        assert str(typed[column].dtype) == "Int64", (column, typed[column].dtype)
    assert list(typed.loc[typed["status"] == "completed", "epochs_run"].unique()) == [4]
    assert 'pd.read_csv("tables/trials.csv", dtype_backend="numpy_nullable")' in DOCS.read_text()


# ---------------------------------------------------------------------------- outer candidate families
def test_nested_families_named_by_their_candidate_are_compared_and_drawn(tmp_path, template):
    from dashboards.figures import figure_depth
    from dashboards.stats import arm_table, family_parts, paired_comparisons

    assert family_parts("nlstm-d2-tanh") == ("nlstm", 2, "tanh") and family_parts("single-d1") == ("single", 1, "")
    tanh = {FAMILY_TAG: "nlstm-d2-tanh", CANDIDATE_TAG: "tanh"}
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=1.45 + noise(s), test=1.46 + noise(s),
                    tags={CANDIDATE_TAG: "identity"}) for s in (1, 2, 3)]
    runs += [FakeRun("evaluate", "nlstm", 2, s, valid=1.50 + noise(s + 3), test=1.51 + noise(s + 3), tags=tanh,
                     factors={"candidate_activation": "tanh"}) for s in (1, 2, 3)]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=1.55 + noise(s + 6), test=1.56 + noise(s + 6))
             for s in (1, 2, 3)]
    data, aset = analysed(tmp_path, runs, template)
    assert set(data.trials["candidate_activation"]) == {"identity", "tanh"}
    pairs = {(c.nested, c.other) for c in paired_comparisons(aset, arm_table(aset))}
    assert pairs == {("nlstm-d2", "stacked-d2"), ("nlstm-d2-tanh", "stacked-d2")}
    res = figure_depth(aset)
    assert res.figure is not None, res.missing
    labels = {t.get_text() for t in res.figure.axes[0].get_legend().get_texts()}
    assert {"nlstm", "nlstm-tanh", "stacked"} <= labels


# ---------------------------------------------------------------------------- figures and intervals
def marker_xs(ax) -> dict[str, list[float]]:
    """x positions of each legend label's line (seaborn's lineplot: one Line2D per hue level, in hue order)."""
    lines = [line for line in ax.get_lines() if line.get_marker() not in (None, "None", "")]
    return {line.get_label(): sorted(np.atleast_1d(line.get_xdata()).astype(float)) for line in lines}


def test_families_at_one_budget_are_dodged_and_unsupported_intervals_are_not_drawn(tmp_path, template):
    from dashboards.figures import figure_parameter_matched
    from dashboards.report import build_report, render_markdown
    from dashboards.stats import t_errorbar

    wide = {1: 0.2, 2: 3.0, 3: 5.0}  # below chance (5.644 - 0.1), but a t-interval reaching below 0 BPC
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=1.45 + noise(s), test=1.46 + noise(s)) for s in (1, 2)]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=wide[s], test=wide[s]) for s in (1, 2, 3)]
    runs += [FakeRun("evaluate", "single", 1, s, valid=1.40 + noise(s), test=1.41 + noise(s)) for s in (1, 2, 3)]
    data, aset = analysed(tmp_path, runs, template)
    res = figure_parameter_matched(aset)
    assert res.figure is not None, res.missing
    ax = res.figure.axes[0]
    xs = [x for line in ax.get_lines() for x in np.atleast_1d(line.get_xdata()) if np.isfinite(x)]
    centres = sorted({round(x, 3) for x in xs})
    assert len(centres) == 3  # one x per family, not one marker over another
    ratios = np.diff(np.log10(centres))
    assert (ratios >= 0.009).all(), centres  # 0.01 decade apart (the achieved counts differ by < 0.1 %)
    assert any("side by side" in n for n in res.notes)
    note = next(n for n in res.notes if n.startswith("No interval bar"))
    assert "nlstm-d2 at 20k (n = 2)" in note and "stacked-d2 at 20k (n = 3)" in note and "single-d1" not in note
    assert t_errorbar(list(wide.values())) == (pytest.approx(np.mean(list(wide.values()))),) * 2  # no bar
    doc, frames = build_report(data)
    md = render_markdown(doc)
    arms = frames["arms"]
    for family in ("nlstm-d2", "stacked-d2"):
        rows = arms[(arms["family"] == family) & arms["split"].isin(["valid", "test"])]
        assert rows["bpc_ci95_low"].isna().all() and rows["bpc_ci95_high"].isna().all()
    assert arms[arms["family"] == "single-d1"]["bpc_ci95_low"].notna().all()
    table = md.split("**Per arm", 1)[1].split("\n_", 1)[0]  # the table, up to its note
    assert "(n = 2)" in table and "(n = 3; no interval: it would reach below 0)" in table
    assert not re.search(r"\[-\d", table), table  # never a negative BPC bound
    comparisons = frames["comparisons"]
    single = comparisons[(comparisons["other_family"] == "single-d1") & (comparisons["split"] == "test")].iloc[0]
    assert single["test"] == "Welch's t-test" and math.isnan(single["nested_minus_other_bpc_ci95_low"])  # 2 seeds
    assert "none (fewer than 3 seeds a side)" in md


def test_families_at_one_dependency_length_are_dodged(tmp_path, template):
    from dashboards.figures import figure_long_range

    runs = [FakeRun("ablation", arch, 2, s, valid=1.5 + noise(s), test=1.5 + noise(s),
                    factors={"dependency_length": length},
                    metrics={"closer_bpc": 1.0 + noise(s + length), "closer_bound_bits": 2.0})
            for length in (10, 40) for arch in ("nlstm", "stacked") for s in (1, 2, 3)]
    data, aset = analysed(tmp_path, runs, template)
    res = figure_long_range(data, aset)
    assert res.figure is not None, res.missing
    xs = sorted({round(x, 4) for line in res.figure.axes[0].get_lines()
                 for x in np.atleast_1d(line.get_xdata()) if np.isfinite(x) and x > 1})
    for length in (10, 40):
        near = [x for x in xs if abs(np.log10(x / length)) < 0.1]
        assert len(near) == 2 and near[0] < length < near[1], xs  # nested left, stacked right of the length


def test_memory_timescales_of_one_family_at_one_level_are_drawn(tmp_path, template):
    from dashboards.figures import figure_timescales

    runs = [FakeRun("evaluate", "single", 1, s, valid=1.5 + noise(s), test=1.5 + noise(s),
                    metrics={"timescale_l0": 10.0 + s, "step_change_l0": 0.1}) for s in (1, 2, 3)]
    data, aset = analysed(tmp_path, runs, template)
    res = figure_timescales(data, aset)  # seaborn's pointplot dodge with one hue level divided by zero here
    assert res.figure is not None and res.missing is None


def test_the_docs_count_the_figures_the_report_draws(tmp_path, template):
    from dashboards import load_study
    from dashboards.figures import all_figures

    data = load_study(STUDY, make_store(tmp_path, [], template=template))
    figures = all_figures(data)
    doc = DOCS.read_text()
    listed = re.findall(r"^(\d)\. \*", doc.split("**Figures.**", 1)[1].split("\n## ", 1)[0], flags=re.M)
    assert [int(n) for n in listed] == [f.number for f in figures] == list(range(1, 9))
    assert "eight figures" in doc and "six figures" not in doc and "seven figures" not in doc


# ---------------------------------------------------------------------------- importance as optuna-dashboard
SPACE = {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
         "dropout": {"type": "float", "low": 0.0, "high": 0.5, "log": False}}


def importance_runs() -> list[FakeRun]:
    rng = np.random.default_rng(3)
    runs = []
    for arch, base in (("nlstm", 1.6), ("stacked", 1.5)):
        for _ in range(12):
            lr, dropout = float(10 ** rng.uniform(-4, -1)), float(rng.uniform(0, 0.5))
            runs.append(FakeRun("search", arch, 2, 0, valid=base + abs(np.log10(lr) + 2.5) * 0.2 + 0.02 * dropout,
                                lr=lr, factors={"dropout": dropout}))
    return runs


def dashboard_importance(runs: list[FakeRun], arch: str) -> dict[str, float]:
    """What optuna-dashboard 0.21 computes for an Optuna study holding this family's trials, as the searcher
    stores them: get_param_importances with PedAnovaImportanceEvaluator and target = the objective value."""
    import optuna
    from optuna.distributions import FloatDistribution

    dists = {name: FloatDistribution(e["low"], e["high"], log=e["log"]) for name, e in SPACE.items()}
    study = optuna.create_study(direction="minimize")
    for r in runs:
        if r.arch == arch:
            study.add_trial(optuna.trial.create_trial(params={"lr": r.lr, "dropout": r.factors["dropout"]},
                                                      distributions=dists, value=r.valid))
    with warnings.catch_warnings():  # the dashboard passes a target, which PED-ANOVA warns about
        warnings.simplefilter("ignore")
        return optuna.importance.get_param_importances(
            study, target=lambda t: t.values[0], evaluator=optuna.importance.PedAnovaImportanceEvaluator())


def test_importance_is_optuna_dashboards_estimator_per_family(tmp_path, template):
    from mlflow.tracking import MlflowClient

    from dashboards import load_study
    from dashboards.figures import figure_search
    from dashboards.importance import PED_ANOVA, family_importances, spec_search_space
    from dashboards.stats import analysis_set

    runs = importance_runs()
    uri = make_store(tmp_path, runs, template=template)
    data = load_study(STUDY, uri)
    assert spec_search_space(data.client, data.parent["run_id"]) is None  # no spec.json yet
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"name": STUDY, "search": {"space": SPACE | {"arch": {"type": "categorical",
                                                                                      "choices": ["nlstm"]}}}}))
    MlflowClient(uri).log_artifact(data.parent["run_id"], str(spec))
    space = spec_search_space(data.client, data.parent["run_id"])
    assert set(space) == {"lr", "dropout", "arch"}
    done = data.trials[data.trials["phase"] == "search"]
    table = family_importances(done, ["dropout", "lr"], space)
    assert set(table["family"]) == {"nlstm-d2", "stacked-d2"} and "family" not in set(table["parameter"])
    assert (table["method"] == PED_ANOVA).all() and (table["domain"] == "search space").all()
    for family, arch in (("nlstm-d2", "nlstm"), ("stacked-d2", "stacked")):
        got = table[table["family"] == family].set_index("parameter")["importance"].to_dict()
        expected = dashboard_importance(runs, arch)
        assert got == pytest.approx(expected, abs=1e-12), (family, got, expected)
        assert sum(got.values()) == pytest.approx(1.0)  # normalised, as the dashboard shows them
    # without the search space, the observed range stands in, and the figure's note says that it can differ
    observed = family_importances(done, ["dropout", "lr"], None)
    assert (observed["domain"] == "observed range").all()
    res = figure_search(data, analysis_set(data.trials))
    assert res.figure is not None, res.missing
    note = next(n for n in res.notes if "optuna-dashboard" in n)
    assert "per family" in note and "search space's bounds from spec.json" in note
    assert "PED-ANOVA" in res.caption and "nlstm-d2 12, stacked-d2 12" in res.caption
