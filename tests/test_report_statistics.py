"""The report's statistics defend themselves: runs that did not learn, arms from different protocols, unpaired seeds.

Each test writes a small study store straight into a temporary sqlite file with ``MlflowClient`` in the
layout of ``docs/mlflow-layout.md`` (no training: the BPC values are chosen to make each case clear),
then renders the report with ``dashboards.report.write_report`` and reads back ``report.md`` and the CSV
tables. Expected numbers are recomputed here with scipy from the values logged.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
STUDY = "stats-study"
VOCAB = 50  # log2(50) = 5.64 bits: uniform guessing
BUDGET = 20_000
EMBEDDING = 16
TAG = "nlstm."


@dataclass
class FakeRun:
    """One trial run as the study records it; its numbers are given, not trained."""

    phase: str
    arch: str
    depth: int
    seed: int
    valid: float
    test: float | None = None
    lr: float = 2e-3
    epochs: int = 4
    state: str = "completed"  # completed | pruned | failed | running
    reason: str = ""
    extra: dict = field(default_factory=dict)  # more params (e.g. unigram_entropy_bits)
    budget: int = BUDGET
    factors: dict = field(default_factory=dict)  # more params that are part of the configuration (its hash)
    metrics: dict = field(default_factory=dict)  # more final metrics (e.g. closer_bpc)
    seconds_per_epoch: float = 10.0  # cumulative train_time_s after epoch e: e * seconds_per_epoch
    tags: dict = field(default_factory=dict)  # more trial tags (the next record's: nlstm.stop_reason, ...)
    epoch_metrics: dict = field(default_factory=dict)  # more per-epoch metrics, one value every epoch (cpu_share)

    @property
    def family(self) -> str:
        return f"{self.arch}-d{self.depth}"

    @property
    def config(self) -> dict:
        return {"arch": self.arch, "depth": self.depth, "budget": self.budget, "lr": self.lr, "epochs": self.epochs,
                **self.factors}

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite file: creating one runs MLflow's migrations (seconds), copying it not."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def make_store(root: Path, runs: list[FakeRun], parent_params: dict | None = None, template: Path | None = None,
               parent_tags: dict | None = None) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from nlstm.params import width_for_budget

    if template is not None:
        shutil.copyfile(template, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(STUDY, artifact_location=(root / "mlruns").as_uri())
    pid = client.create_run(exp, run_name=STUDY, tags={TAG + "kind": "study", TAG + "study": STUDY}
                            | (parent_tags or {})).info.run_id
    client.log_batch(pid, params=[Param(k, str(v)) for k, v in ({"corpus": "ptb", "metric": "valid_bpc"}
                                                               | (parent_params or {})).items()])
    config_runs: dict[tuple[str, str], str] = {}
    now = int(time.time() * 1000)
    for run in runs:
        parent = pid
        if run.phase != "search":
            key = (run.phase, run.config_hash)
            if key not in config_runs:
                config_runs[key] = client.create_run(exp, run_name=f"{run.phase}-{run.family}", tags={
                    "mlflow.parentRunId": pid, TAG + "kind": "config", TAG + "phase": run.phase,
                    TAG + "config_hash": run.config_hash, TAG + "arch": run.arch, TAG + "depth": str(run.depth),
                    TAG + "family": run.family}).info.run_id
            parent = config_runs[key]
        trial_id = f"{run.phase}-{run.config_hash}-s{run.seed}"
        rid = client.create_run(exp, run_name=trial_id, tags={
            "mlflow.parentRunId": parent, TAG + "kind": "trial", TAG + "phase": run.phase, TAG + "study": STUDY,
            TAG + "arch": run.arch, TAG + "depth": str(run.depth), TAG + "family": run.family,
            TAG + "config_hash": run.config_hash, TAG + "seed": str(run.seed), TAG + "trial_id": trial_id,
            TAG + "status": "running"} | run.tags).info.run_id
        sol = width_for_budget(run.arch, run.depth, run.budget, VOCAB, EMBEDDING)
        params = run.config | {"width": sol.width, "embedding_dim": sol.embedding_dim, "num_params": sol.params,
                               "seed": run.seed} | run.extra
        curve = [run.valid + 0.5 * (run.epochs - e) for e in range(1, run.epochs + 1)]
        metrics = [Metric(k, v, now + e, e) for e, bpc in enumerate(curve, start=1) for k, v in (
            ("valid_bpc", bpc), ("train_bpc", bpc - 0.05), ("train_time_s", run.seconds_per_epoch * e),
            ("tokens_seen", 1e4 * e), ("tokens_per_s", 1000.0), *run.epoch_metrics.items())]
        tags = [RunTag(TAG + "status", run.state)]
        if run.state == "failed":
            tags.append(RunTag(TAG + "fail_reason", run.reason))
            metrics = metrics[:5]
        elif run.state in ("completed", "pruned"):  # a pruned run: what it reached when the scheduler stopped it
            final = {"best_valid_bpc": run.valid, "num_params": sol.params, "epochs_run": run.epochs} | run.metrics
            if run.test is not None and run.state == "completed":
                final["test_bpc"] = run.test
            metrics += [Metric(k, float(v), now + 100, 0) for k, v in final.items()]
        else:
            tags = []
        client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
        if run.state != "running":
            client.set_terminated(rid, {"completed": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}[run.state])
    for phase in sorted({r.phase for r in runs}):
        client.set_tag(pid, f"{TAG}phase.{phase}", "done")
    client.set_terminated(pid, "FINISHED")
    return uri


def render(root: Path, runs: list[FakeRun], template: Path, parent_params: dict | None = None,
           parent_tags: dict | None = None):
    """(report.md text, arms.csv, comparisons.csv) of a store holding ``runs``."""
    from dashboards import load_study
    from dashboards.report import write_report

    uri = make_store(root, runs, parent_params, template, parent_tags)
    files = write_report(load_study(STUDY, uri), root / "report", log_to_parent=False)
    tables = root / "report" / "tables"
    assert "could not be drawn" not in files.markdown.read_text()  # the figures cope with every case too
    return files.markdown.read_text(), pd.read_csv(tables / "arms.csv"), pd.read_csv(tables / "comparisons.csv")


def arm(arms: pd.DataFrame, family: str, split: str = "valid") -> pd.Series:
    """One arm's row of the long ``arms.csv`` (its arm-level columns are the same on both splits)."""
    rows = arms[(arms["family"] == family) & (arms["split"] == split)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def verdicts(md: str) -> list[str]:
    section = md.split("## Nested vs stacked and single", 1)[1].split("\n## ", 1)[0]
    section = section.split("\nAt equal training time", 1)[0]  # its own verdicts: tests/test_equal_time.py
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def noise(seed: int, scale: float = 0.01) -> float:
    return float(np.random.default_rng(seed).normal(0.0, scale))


# ---------------------------------------------------------------------------- did not learn (issue 8, item 7)
def test_arms_that_did_not_learn_name_no_winner(tmp_path, empty_db):
    """lr far too high: every run 'completes' at 15-700 BPC (chance: 5.64); nested is consistently 'better'."""
    level = {"nlstm": 15.0, "stacked": 300.0, "single": 700.0}
    runs = [FakeRun("evaluate", arch, 1 if arch == "single" else 2, seed, valid=level[arch] + seed,
                    test=level[arch] + seed + 0.5, lr=50.0)
            for arch in level for seed in (1, 2, 3, 4, 5)]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    said = verdicts(md)
    assert said and not any(" has a lower " in v for v in said), said
    assert all("did not learn" in v and "no winner" in v for v in said), said
    assert all("5 of 5 (5 did not learn)" in v for v in said), said  # both arms' exclusions, in every verdict
    assert set(arms["family"]) == {"nlstm-d2", "stacked-d2", "single-d1"}
    assert (arms["n_did_not_learn"] == 5).all() and (arms["n_seeds"] == 0).all() and arms["bpc_mean"].isna().all()
    assert (comparisons["test"] == "none").all() and comparisons["p_value"].isna().all()
    excluded = md.split("**Excluded runs**", 1)[1]
    assert len(re.findall(r"^\| evaluate-", excluded, flags=re.M)) == 15
    assert ("valid BPC 16.000 is not 0.1 bit below chance, 5.644 (log2(vocabulary 50, from the parameter count))"
            in excluded)


def test_one_arm_did_not_learn_in_some_seeds(tmp_path, empty_db):
    """The apparent winner diverged in 2 of 5 seeds: its survivors are a biased sample, so no winner."""
    runs = [FakeRun("evaluate", "stacked", 2, s, valid=1.60 + noise(s), test=1.62 + noise(s)) for s in range(1, 6)]
    runs += [FakeRun("evaluate", "nlstm", 2, s, valid=1.40 + noise(s + 10), test=1.42 + noise(s + 10))
             for s in (1, 2, 3)]
    runs += [FakeRun("evaluate", "nlstm", 2, 4, valid=9.0, test=9.1),  # worse than uniform guessing
             FakeRun("evaluate", "nlstm", 2, 5, valid=math.nan, state="failed",
                     reason="did not learn: valid BPC 5.70 after epoch 1 is not below the unigram entropy 4.40")]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    nested = arm(arms, "nlstm-d2")
    assert (nested["n_seeds"], nested["n_did_not_learn"], nested["excluded"]) == (3, 2, "2 of 5 (2 did not learn)")
    said = verdicts(md)
    assert len(said) == 1 and "no winner" in said[0] and "did not learn in 2 of" in said[0], said
    assert "nlstm-d2 2 of 5 (2 did not learn)" in said[0] and "stacked-d2 none of 5" in said[0]


def test_recorded_entropy_is_the_bar(tmp_path, empty_db):
    """A run below log2(V) but not below the recorded unigram entropy did not learn."""
    entropy = {"unigram_entropy_bits": 4.4}
    runs = [FakeRun("evaluate", arch, 2, s, valid=v + noise(s), test=v + noise(s), extra=entropy)
            for arch, v in (("nlstm", 4.6), ("stacked", 1.5)) for s in (1, 2, 3)]
    md, arms, _ = render(tmp_path, runs, empty_db)
    assert arm(arms, "nlstm-d2")["n_did_not_learn"] == 3
    assert "not 0.1 bit below chance, 4.400 (unigram entropy)" in md
    assert not any(" has a lower " in v for v in verdicts(md))


# ---------------------------------------------------------------------------- one protocol (issue 8, item 8)
def test_arms_are_compared_within_one_protocol(tmp_path, empty_db):
    """nested's best config is in evaluate (seeds 1-5), stacked's in ablation (seeds 11-13): never paired across."""
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=1.40 + noise(s), test=1.41 + noise(s), epochs=6)
            for s in range(1, 6)]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=1.60 + noise(s + 20), test=1.61 + noise(s + 20), epochs=6)
             for s in range(1, 6)]
    runs += [FakeRun("ablation", "nlstm", 2, s, valid=1.50 + noise(s + 40), test=1.52 + noise(s + 40), epochs=3)
             for s in (11, 12, 13)]
    runs += [FakeRun("ablation", "stacked", 2, s, valid=1.30 + noise(s + 60), test=1.33 + noise(s + 60), epochs=3)
             for s in (11, 12, 13)]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    valid = arms[arms["split"] == "valid"]
    assert sorted(zip(valid["protocol"], valid["family"], valid["n_seeds"], strict=True)) == [
        ("ablation", "nlstm-d2", 3), ("ablation", "stacked-d2", 3), ("evaluate", "nlstm-d2", 5),
        ("evaluate", "stacked-d2", 5)]
    test_rows = comparisons[comparisons["split"] == "test"].set_index("protocol")
    assert set(test_rows.index) == {"evaluate", "ablation"}
    assert (test_rows["test"] == "paired t-test").all()
    assert test_rows.loc["evaluate", "n_pairs"] == 5 and test_rows.loc["ablation", "n_pairs"] == 3
    for phase, seeds in (("evaluate", range(1, 6)), ("ablation", (11, 12, 13))):
        a = [next(r.test for r in runs if r.phase == phase and r.arch == "nlstm" and r.seed == s) for s in seeds]
        b = [next(r.test for r in runs if r.phase == phase and r.arch == "stacked" and r.seed == s) for s in seeds]
        res = stats.ttest_rel(a, b)
        low, high = res.confidence_interval(0.95)
        assert test_rows.loc[phase, "p_value"] == pytest.approx(res.pvalue, rel=1e-9)
        assert (test_rows.loc[phase, "nested_minus_other_bpc_ci95_low"],
                test_rows.loc[phase, "nested_minus_other_bpc_ci95_high"]) == pytest.approx((low, high))
    assert "Note: Shows the evaluate protocol only; the runs of the ablation protocol" in md  # figures do not mix
    said = verdicts(md)
    assert any(v.startswith('nlstm-d2 has a lower test BPC than stacked-d2 at budget 20k in protocol "evaluate"')
               for v in said), said
    assert any(v.startswith('stacked-d2 has a lower test BPC than nlstm-d2 at budget 20k in protocol "ablation"')
               for v in said), said


def test_arms_without_a_common_protocol_are_not_compared(tmp_path, empty_db):
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=1.40 + noise(s), test=1.41 + noise(s)) for s in range(1, 6)]
    runs += [FakeRun("ablation", "stacked", 2, s, valid=1.60 + noise(s), test=1.61 + noise(s))
             for s in (11, 12, 13)]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    said = verdicts(md)
    assert said and all("not run under a common protocol" in v and "no winner" in v for v in said), said
    assert (comparisons["test"] == "none").all()


def test_unpaired_seeds_use_welch(tmp_path, empty_db):
    """Two of stacked's seeds failed: the seed sets differ, so Welch's test over all seeds, not a pairing."""
    nested = {s: 1.40 + noise(s, 0.03) for s in range(1, 6)}
    stacked = {s: 1.55 + noise(s + 30, 0.03) for s in (1, 2, 3)}
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=v, test=v + 0.01) for s, v in nested.items()]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=v, test=v + 0.01) for s, v in stacked.items()]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=math.nan, state="failed",
                     reason="ModuleNotFoundError: No module named 'nlstm'") for s in (4, 5)]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    row = comparisons[comparisons["split"] == "test"].iloc[0]
    a, b = [v + 0.01 for v in nested.values()], [v + 0.01 for v in stacked.values()]
    res = stats.ttest_ind(a, b, equal_var=False)
    low, high = res.confidence_interval(0.95)
    assert row["test"] == "Welch's t-test" and (row["n_seeds_nested"], row["n_seeds_other"]) == (5, 3)
    assert pd.isna(row["n_pairs"])
    assert row["p_value"] == pytest.approx(res.pvalue, rel=1e-9) and row["t_df"] == pytest.approx(res.df, rel=1e-9)
    assert (row["nested_minus_other_bpc_ci95_low"], row["nested_minus_other_bpc_ci95_high"]) == pytest.approx(
        (low, high))
    assert row["excluded"] == "nlstm-d2: none of 5; stacked-d2: 2 of 5 (2 failed)"
    md_row = next(r for r in md.splitlines() if r.startswith("| evaluate |") and "| test BPC |" in r)
    assert "| Welch's t-test |" in md_row and "| 5 and 3 seeds |" in md_row
    said = verdicts(md)
    assert said[0].startswith("nlstm-d2 has a lower test BPC than stacked-d2") and "Welch's t-test" in said[0]
    assert "stacked-d2 2 of 5 (2 failed)" in said[0]
    assert arm(arms, "stacked-d2")["excluded"] == "2 of 5 (2 failed)"


# ---------------------------------------------------------------------------- the pieces
def test_vocabulary_is_solved_exactly_from_the_parameter_count():
    from dashboards.outcome import vocab_from_parameter_count
    from nlstm.params import width_for_budget

    for arch, depth, vocab, emb in (("nlstm", 3, 50, 16), ("stacked", 2, 27, 8), ("single", 1, 205, None)):
        sol = width_for_budget(arch, depth, 30_000, vocab, emb)
        assert vocab_from_parameter_count(arch, depth, sol.width, sol.embedding_dim, sol.params) == vocab
        assert vocab_from_parameter_count(arch, depth, sol.width, sol.embedding_dim, sol.params + 1) is None


def test_outcomes_follow_status_reason_and_bar():
    from dashboards.outcome import classify_runs

    trials = pd.DataFrame({
        "state": ["completed", "completed", "failed", "failed", "failed", "pruned", "running", "completed"],
        "fail_reason": [None, None, "diverged: training loss became nan at epoch 1", "did not learn: 5.9 >= 4.4",
                        "ModuleNotFoundError: nlstm", None, None, None],
        "mlflow_status": ["FINISHED"] * 8,
        "best_valid_bpc": [1.5, 5.0, math.nan, math.nan, math.nan, 2.0, math.nan, 1.2],
        "test_bpc": [1.6, 4.0, math.nan, math.nan, math.nan, math.nan, math.nan, math.inf],
        "vocab_size": [32] * 8})  # log2(32) = 5
    out = classify_runs(trials, {"unigram_entropy_bits": "4.5"})
    assert list(out["outcome"]) == ["learned", "did not learn", "did not learn", "did not learn", "failed",
                                    "pruned", "running", "did not learn"]
    assert (out["chance_bpc"] == 4.5).all() and (out["chance_source"] == "unigram entropy").all()
    assert "valid BPC 5.000 is not 0.1 bit below chance, 4.500" in out.loc[1, "outcome_reason"]
    assert (classify_runs(trials)["chance_bpc"] == 5.0).all()  # no entropy recorded: log2(vocab_size)


def test_the_chance_rule_is_study_layouts_below_chance_with_its_margin():
    """One chance rule everywhere (study.record.layout.below_chance): below the unigram entropy is not enough, a run
    must be CHANCE_MARGIN_BITS (0.1 bit) below it; log2(vocabulary) stands in only where no entropy is recorded."""
    from dashboards.outcome import classify_runs
    from study.record.layout import CHANCE_MARGIN_BITS

    assert CHANCE_MARGIN_BITS == 0.1
    trials = pd.DataFrame({"state": ["completed"] * 4, "fail_reason": [None] * 4, "mlflow_status": ["FINISHED"] * 4,
                           "best_valid_bpc": [4.45, 4.39, 4.95, 4.85], "test_bpc": [4.0, 4.0, 4.0, 4.0],
                           "unigram_entropy_bits": [4.5, 4.5, None, None], "vocab_size": [32] * 4})
    out = classify_runs(trials)
    # 4.45 < 4.5 but not by 0.1 bit; 4.39 is; without an entropy the bar is log2(32) = 5: 4.95 no, 4.85 yes
    assert list(out["outcome"]) == ["did not learn", "learned", "did not learn", "learned"]
    assert list(out["chance_source"]) == ["unigram entropy", "unigram entropy", "log2(vocabulary 32)",
                                          "log2(vocabulary 32)"]


def test_a_phase_with_two_training_budgets_is_two_protocols():
    from dashboards.stats import with_protocol

    runs = pd.DataFrame({"phase": ["evaluate", "evaluate", "ablation", "ablation", "ablation", "ablation"],
                         "epochs": [50, None, 10, 20, 20, None]})  # None: failed before its params were logged
    assert list(with_protocol(runs)["protocol"]) == ["evaluate", "evaluate", "ablation, epochs 10",
                                                     "ablation, epochs 20", "ablation, epochs 20",
                                                     "ablation, epochs unknown"]


def test_representative_configuration_is_one_whose_runs_all_learned(tmp_path, empty_db):
    """Of two configurations of nlstm-d2, the lower mean valid BPC comes from one that diverged in a seed."""
    seeds = (1, 2, 3, 4)
    runs = [FakeRun("evaluate", "nlstm", 2, s, valid=1.40 + noise(s), test=1.41, lr=1e-2) for s in seeds[:3]]
    runs += [FakeRun("evaluate", "nlstm", 2, 4, valid=math.nan, lr=1e-2, state="failed",
                     reason="diverged: training loss became inf at epoch 3")]
    runs += [FakeRun("evaluate", "nlstm", 2, s, valid=1.45 + noise(s + 5), test=1.46, lr=2e-3) for s in seeds]
    runs += [FakeRun("evaluate", "stacked", 2, s, valid=1.60 + noise(s + 9), test=1.61) for s in seeds]
    md, arms, comparisons = render(tmp_path, runs, empty_db)
    nested = arm(arms, "nlstm-d2")
    stable = next(r.config_hash for r in runs if r.lr == 2e-3)
    assert nested["config_hash"] == stable and nested["n_configs"] == 2 and nested["n_seeds"] == 4
    assert nested["excluded"] == "1 of 8 (1 did not learn)"
    configs = pd.read_csv(tmp_path / "report" / "tables" / "configs.csv")
    configs = configs[configs["split"] == "valid"].set_index("config_hash")
    assert configs.loc[stable, "represents_arm"] and configs.loc[stable, "excluded"] == "none of 4"
    assert comparisons[comparisons["split"] == "test"]["test"].tolist() == ["paired t-test"]
    assert "**Every configuration of the analysed phases**" in md


# ---------------------------------------------------------------------------- the paper's two questions (issue 10)
def analysed(root: Path, runs: list[FakeRun], template: Path):
    from dashboards import load_study
    from dashboards.stats import analysis_set

    data = load_study(STUDY, make_store(root, runs, template=template))
    return data, analysis_set(data.trials, (data.parent or {}).get("params"))


def test_the_depth_figure_has_a_row_per_budget_with_both_families_at_both_depths(tmp_path, empty_db):
    from dashboards.figures import figure_depth

    runs = [FakeRun("ablation", arch, depth, s, valid=1.5 + 0.01 * depth + noise(s), test=1.5 + noise(s),
                    budget=budget)
            for budget in (20_000, 50_000) for arch in ("nlstm", "stacked") for depth in (2, 3) for s in (1, 2, 3)]
    runs += [FakeRun("ablation", "single", 1, s, valid=1.6, test=1.6 + noise(s), budget=b)
             for b in (20_000, 50_000) for s in (1, 2, 3)]
    _, aset = analysed(tmp_path, runs, empty_db)
    res = figure_depth(aset)
    assert res.figure is not None and len(res.figure.axes) == 4, res.missing
    assert "at budgets 20k and 50k" in res.caption and "12 seed pairs over depths 2, 3" in res.caption
    titles = [ax.get_title() for ax in res.figure.axes]
    assert titles[0].endswith("at budget 20k") and titles[2].endswith("at budget 50k"), titles
    for ax in res.figure.axes[0::2]:  # nested and stacked lines at depths 2 and 3 plus the single point
        xs = sorted({x for line in ax.get_lines() for x in np.atleast_1d(line.get_xdata()) if np.isfinite(x)})
        assert {1.0, 2.0, 3.0} <= {round(x) for x in xs}, xs
        for depth in (2, 3):  # side by side, not one marker over the other (figures.DEPTH_DODGE apart)
            assert sorted({round(x, 6) for x in xs if abs(x - depth) < 0.3}) == [depth - 0.04, depth + 0.04], xs


def test_closer_bpc_is_compared_per_dependency_length_and_drawn_against_the_bound(tmp_path, empty_db):
    from dashboards.figures import figure_long_range

    runs = []
    for length, nested_bits, stacked_bits in ((10, 0.05, 0.10), (40, 0.3, 0.9), (160, 1.2, 1.8), (320, 1.95, 2.05)):
        for arch, bits in (("nlstm", nested_bits), ("stacked", stacked_bits)):
            runs += [FakeRun("ablation", arch, 2, s, valid=1.5 + noise(s), test=1.5 + noise(s),
                             factors={"dependency_length": length},
                             metrics={"closer_bpc": bits + noise(s + 7 * len(arch)), "closer_bound_bits": 2.0,
                                      "timescale_l0": 3.0 + s, "timescale_l1": 30.0 + s})
                     for s in (1, 2, 3)]
    data, aset = analysed(tmp_path, runs, empty_db)
    protocols = sorted(set(aset.selected["protocol"]), key=__import__("dashboards.stats").stats.protocol_key)
    assert protocols == ["ablation, dependency_length 10", "ablation, dependency_length 40",
                         "ablation, dependency_length 160", "ablation, dependency_length 320"]  # numeric order
    from dashboards.stats import paired_comparisons

    closer = [c for c in paired_comparisons(aset) if c.metric == "closer_bpc"]
    assert [c.protocol for c in closer] == protocols and all(c.n_pairs == 3 for c in closer)
    from dashboards.tables import tidy_comparisons

    assert set(tidy_comparisons(closer)["split"]) == {"test_closers"}
    from dashboards.stats import arm_table
    from dashboards.tables import tidy_arms

    arms = tidy_arms(arm_table(aset))
    closer_rows = arms[arms["split"] == "test_closers"].set_index(["protocol", "family"])
    nested_40 = [r.metrics["closer_bpc"] for r in runs if r.arch == "nlstm" and r.factors["dependency_length"] == 40]
    assert closer_rows.loc[("ablation, dependency_length 40", "nlstm-d2"), "bpc_mean"] == pytest.approx(
        np.mean(nested_40))
    assert len(closer_rows) == 8 and (closer_rows["n_seeds"] == 3).all()
    # nested is lower at 160 (1.2 bits: it remembers) and at 320 (1.95: at the 2-bit bound, as is stacked)
    said = {c.protocol.rsplit(" ", 1)[1]: c.verdict for c in closer}
    assert said["160"].startswith("nlstm-d2 has a lower closer BPC than stacked-d2"), said["160"]
    assert "neither arm learned the dependency, so no winner is declared" in said["320"], said["320"]
    by_length = {int(c.protocol.rsplit(" ", 1)[1]): c.diff.mean for c in closer}
    expected = {10: -0.05, 40: -0.6, 160: -0.6, 320: -0.1}
    for length, diff in by_length.items():
        a = [r.metrics["closer_bpc"] for r in runs if r.arch == "nlstm" and r.factors["dependency_length"] == length]
        b = [r.metrics["closer_bpc"] for r in runs if r.arch == "stacked" and r.factors["dependency_length"] == length]
        assert diff == pytest.approx(np.mean(a) - np.mean(b)) and diff == pytest.approx(expected[length], abs=0.05)
    from dashboards.tables import tidy_timescales

    timescales = tidy_timescales(aset.trials)  # every run x level, as recorded: 24 runs x 2 levels
    assert len(timescales) == 48 and set(timescales["level"]) == {0, 1}
    assert sorted(timescales.loc[timescales["level"] == 1, "timescale_steps"]) == sorted(
        [30.0 + s for s in (1, 2, 3)] * 8)
    assert (timescales["outcome"] == "learned").all() and timescales["mean_abs_step_change"].isna().all()
    res = figure_long_range(data, aset)
    assert res.figure is not None, res.missing
    ax = res.figure.axes[0]
    assert any(np.allclose(line.get_ydata(), 2.0) for line in ax.get_lines())  # the no-memory bound
    assert "log2(4 bracket types) = 2 bits" in res.caption and "24 runs" in res.caption
    assert len(res.figure.axes) == 2 and "timescale" in res.figure.axes[1].get_ylabel()


# ---------------------------------------------------------------------------- the CSV tables (issue 12)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "report.md"
OUTCOME_COUNTS = ["n_learned", "n_did_not_learn", "n_failed", "n_pruned", "n_running"]
LOAD = ["time_measurement", "cpu_share_min", "cpu_share_max", "load_per_cpu_max"]
CSV_COLUMNS = {  # trials.csv: tests/test_dashboards.py
    "runs": ["phase", "state", "n_runs"],
    "arms": ["protocol", "budget", "family", "arch", "depth", "split", "n_seeds", "bpc_mean", "bpc_ci95_low",
             "bpc_ci95_high", "equal_time_s", "n_no_eval_before_equal_time", "num_params", "n_configs", "config_hash",
             "tokens_per_s_mean", "train_time_s_mean", *LOAD, "n_runs", *OUTCOME_COUNTS, "config_not_learned",
             "excluded", "stop_reasons", "code_versions"],
    "comparisons": ["protocol", "budget", "split", "nested_family", "other_family", "test", "n_pairs",
                    "n_seeds_nested", "n_seeds_other", "nested_minus_other_bpc_mean",
                    "nested_minus_other_bpc_ci95_low", "nested_minus_other_bpc_ci95_high", "t_statistic", "t_df",
                    "p_value", "p_nested_better", "p_nested_better_boot95_low", "p_nested_better_boot95_high",
                    "n_common_seeds", "n_unpaired_seeds", "equal_time_s", *LOAD, "excluded", "verdict"],
    "configs": ["protocol", "budget", "family", "config_hash", "split", "n_seeds", "bpc_mean", "bpc_ci95_low",
                "bpc_ci95_high", "excluded", "represents_arm"],
    "excluded": ["run_name", "phase", "budget", "family", "seed", "outcome", "outcome_reason"],
    "timescales": ["phase", "family", "arch", "depth", "budget", "seed", "run_id", "outcome", "level",
                   "timescale_steps", "mean_abs_step_change"],
    "expected_best": ["family", "n_trials", "expected_best_valid_bpc", "band_low", "band_high"],
}
INTEGER_COLUMNS = {
    "trials": ["depth", "budget", "num_params", "seed", "epochs_run"],
    "runs": ["n_runs"],
    "arms": ["budget", "depth", "n_seeds", "n_no_eval_before_equal_time", "num_params", "n_configs", "n_runs",
             *OUTCOME_COUNTS, "config_not_learned"],
    "comparisons": ["budget", "n_pairs", "n_seeds_nested", "n_seeds_other", "n_common_seeds", "n_unpaired_seeds"],
    "configs": ["budget", "n_seeds"],
    "excluded": ["budget", "seed"],
    "timescales": ["depth", "budget", "seed", "level"],
    "expected_best": ["n_trials"],
}


def documented_columns(name: str) -> set[str]:
    """The column names docs/report.md lists (first cell of each row) in its table for ``tables/<name>.csv``."""
    lines = DOCS.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and f"`tables/{name}.csv`" in line)
    names: set[str] = set()
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| column"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_csv_tables_are_long_with_units_integers_and_documented_columns(tmp_path, empty_db):
    """Every CSV: one row per arm x split (comparison x split, phase x state, ...), units and interval level in
    the column names, budgets and counts written as integers (20000, not 20000.0), every column in the docs."""
    values = {("nlstm", s): (1.40 + noise(s), 1.42 + noise(s + 5)) for s in (1, 2, 3)}
    values |= {("stacked", s): (1.60 + noise(s + 10), 1.62 + noise(s + 15)) for s in (1, 2, 3)}
    runs = [FakeRun("evaluate", arch, 2, s, valid=v, test=t) for (arch, s), (v, t) in values.items()]
    runs += [FakeRun("evaluate", "stacked", 2, 4, valid=math.nan, state="failed",
                     reason="ModuleNotFoundError: No module named 'nlstm'")]
    render(tmp_path, runs, empty_db)
    tables = tmp_path / "report" / "tables"
    assert sorted(p.stem for p in tables.glob("*.csv")) == sorted(INTEGER_COLUMNS)
    frames = {name: pd.read_csv(tables / f"{name}.csv") for name in INTEGER_COLUMNS}
    for name, frame in frames.items():
        if name in CSV_COLUMNS:
            assert list(frame.columns) == CSV_COLUMNS[name], name
        text = pd.read_csv(tables / f"{name}.csv", dtype=str, keep_default_na=False)
        for column in INTEGER_COLUMNS[name]:
            assert text[column].str.fullmatch(r"-?\d*").all(), (name, column, text[column].tolist())
        undocumented = {c for c in frame.columns if not c.startswith("factor.")} - documented_columns(name)
        assert not undocumented, (name, undocumented)

    counts = frames["runs"].set_index(["phase", "state"])["n_runs"].to_dict()
    assert counts == {("evaluate", "completed"): 6, ("evaluate", "running"): 0, ("evaluate", "pruned"): 0,
                      ("evaluate", "failed"): 1}
    arms = frames["arms"]
    assert list(zip(arms["family"], arms["split"], strict=True)) == [
        (family, split) for family in ("nlstm-d2", "stacked-d2") for split in ("valid", "test", "valid_equal_time")]
    # every run trained 40 s (4 epochs of 10 s), so T* = 40 s and the BPC there is the last, best valid BPC
    for family in ("nlstm-d2", "stacked-d2"):
        at_t, valid = arm(arms, family, "valid_equal_time"), arm(arms, family, "valid")
        assert at_t["equal_time_s"] == 40.0 and at_t["n_no_eval_before_equal_time"] == 0
        assert (at_t["bpc_mean"], at_t["bpc_ci95_low"]) == pytest.approx((valid["bpc_mean"], valid["bpc_ci95_low"]))
    assert (arms["budget"] == BUDGET).all() and (arms["n_seeds"] == 3).all()
    for arch, family in (("nlstm", "nlstm-d2"), ("stacked", "stacked-d2")):
        for i, split in enumerate(("valid", "test")):
            x = [values[arch, s][i] for s in (1, 2, 3)]
            low, high = stats.t.interval(0.95, 2, loc=np.mean(x), scale=stats.sem(x))
            row = arm(arms, family, split)
            assert (row["bpc_mean"], row["bpc_ci95_low"], row["bpc_ci95_high"]) == pytest.approx(
                (np.mean(x), low, high), rel=1e-9)
    assert arm(arms, "stacked-d2", "test")["n_failed"] == 1 and arm(arms, "stacked-d2", "test")["n_runs"] == 4
    comparisons = frames["comparisons"].set_index("split")
    assert sorted(comparisons.index) == ["test", "valid", "valid_equal_time"] and (comparisons["n_pairs"] == 3).all()
    for i, split in enumerate(("valid", "test")):
        d = [values["nlstm", s][i] - values["stacked", s][i] for s in (1, 2, 3)]
        row = comparisons.loc[split]
        assert (row["nested_family"], row["other_family"]) == ("nlstm-d2", "stacked-d2")
        assert row["nested_minus_other_bpc_mean"] == pytest.approx(np.mean(d), rel=1e-9)
        assert row["nested_minus_other_bpc_mean"] < 0  # the sign convention: nested (lower BPC here) minus other
        assert row["p_value"] == pytest.approx(stats.ttest_rel(
            [values["nlstm", s][i] for s in (1, 2, 3)], [values["stacked", s][i] for s in (1, 2, 3)]).pvalue)
        assert row["verdict"].startswith("nlstm-d2 has a lower")
    configs = frames["configs"]
    assert len(configs) == 4 and configs["represents_arm"].all()
    excluded = frames["excluded"]
    assert excluded[["phase", "budget", "family", "seed", "outcome"]].values.tolist() == [
        ["evaluate", BUDGET, "stacked-d2", 4, "failed"]]
