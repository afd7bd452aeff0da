"""The report's CSV tables (``tables/*.csv``): tidy, so anyone can re-plot a study with pandas alone.

One row per observation, one column per variable, every column documented in docs/report.md:

- ``trials.csv``: one row per trial run (below);
- ``runs.csv``: one row per phase x state (how many trial runs);
- ``arms.csv``: one row per arm x split (the BPC of an arm on validation and on test);
- ``comparisons.csv``: one row per comparison x split (``nested - other``);
- ``configs.csv``: one row per configuration x split;
- ``excluded.csv``: one row per run left out of the statistics;
- ``timescales.csv``: one row per trial run x memory level/layer (the memory timescales of figure 6);
- ``expected_best.csv``: one row per family x number of tuning trials (:mod:`dashboards.expected_best`).

Column names carry the unit (``_bpc`` bits per symbol, ``_s`` seconds, ``_per_s``) and the interval
level (``ci95``: two-sided 95 % Student-t); the sign of a difference is in its name
(``nested_minus_other_bpc``). Budgets, counts, depths and seeds are integers (pandas ``Int64``,
empty where unknown), never ``20000.0``; a column with empty cells reads back as integers with
``pd.read_csv(path, dtype_backend="numpy_nullable")`` (a plain ``read_csv`` has no integer with a
missing value, so it gives floats there). The report's Markdown and HTML tables are formatted from
the same statistics (:mod:`dashboards.stats`); these are their full-precision, machine-readable form.

``trials.csv`` columns: identity (``study, phase, family, arch, depth, candidate_activation, budget,
num_params, seed, trial_id, run_id, code_version``), how it ended (``status``: completed | pruned | failed |
running, as recorded; ``stop_reason`` with ``stop_reason_source``: recorded, or derived where the record
makes it certain, :mod:`dashboards.stop_reason`; ``outcome``: learned | did not learn | failed | pruned |
running, as the report judges it, with ``outcome_reason``), results (``valid_bpc`` = the best validation BPC of
the run, ``test_bpc`` of the weights selected on validation, ``epochs_run``, ``train_time_s``,
``tokens_per_s``), the hyper-parameters and ablation factors that vary in the study, and the
long-range probe (``dependency_length``, ``closer_bpc``) where recorded.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dashboards.load import STATES
from dashboards.outcome import OUTCOMES
from dashboards.stats import CONFIDENCE, EQUAL_TIME, PAIRED, Comparison, has_equal_time, has_probe
from dashboards.timescales import timescale_frame

IDENTITY = ["study", "phase", "family", "arch", "depth", "candidate_activation", "budget", "num_params", "seed",
            "trial_id", "run_id", "code_version"]
ENDING = ["status", "stop_reason", "stop_reason_source", "outcome", "outcome_reason"]
RESULTS = ["valid_bpc", "test_bpc", "epochs_run", "train_time_s", "tokens_per_s"]
PROBE = ["dependency_length", "closer_bpc"]
INTEGERS = ["depth", "budget", "num_params", "seed", "epochs_run", "dependency_length"]


def trials_table(judged: pd.DataFrame, hyper_parameters: list[str] | None = None) -> pd.DataFrame:
    """The judged trial runs (``dashboards.outcome.classify_runs``) as the tidy per-run table."""
    # "valid_bpc" here is the run's best, not the last epoch's (the per-epoch metric of the same name).
    frame = judged.drop(columns=["valid_bpc"], errors="ignore").rename(columns={"best_valid_bpc": "valid_bpc"})
    frame["status"] = frame.get("state")
    varying = [c for c in (hyper_parameters or []) if c in frame and c not in IDENTITY + RESULTS + PROBE
               and frame[c].nunique(dropna=True) > 1]
    factors = sorted(c for c in frame.columns if c.startswith("factor."))
    columns = IDENTITY + ENDING + RESULTS + varying + factors + [c for c in PROBE if c in frame]
    for column in columns:
        if column not in frame:
            frame[column] = pd.NA
    out = frame[columns].reset_index(drop=True)
    for column in INTEGERS:
        if column in out:
            out[column] = as_integers(out[column])
    return out.sort_values(["phase", "family", "seed", "trial_id"], kind="stable", na_position="last").reset_index(
        drop=True)


CI = f"ci{round(CONFIDENCE * 100)}"  # the interval level in column names: ci95
# stats' metric -> the split column's value; closer_bpc: the test split's dependent closers only (long-range probe)
# valid_equal_time: valid BPC at equal training time T* (dashboards.equal_time)
SPLIT = {"best_valid_bpc": "valid", "test_bpc": "test", "closer_bpc": "test_closers", EQUAL_TIME: "valid_equal_time"}
BPC = ["bpc_mean", f"bpc_{CI}_low", f"bpc_{CI}_high"]
OUTCOME_COUNTS = [f"n_{o.replace(' ', '_')}" for o in OUTCOMES]  # n_learned, n_did_not_learn, ...


def as_integers(column: pd.Series) -> pd.Series:
    """Whole numbers as pandas ``Int64`` (missing stays missing): ``20000.0`` becomes ``20000``."""
    return pd.to_numeric(column, errors="coerce").round().astype("Int64")


def _whole_numbers_as_integers(column: pd.Series) -> pd.Series:
    """A factor column as integers when every value is a whole number, else as it is (``tanh``, ``0.5``)."""
    numbers = pd.to_numeric(column, errors="coerce")
    known = column.notna()
    if known.any() and numbers[known].notna().all() and np.isfinite(numbers[known]).all() \
            and (numbers[known] % 1 == 0).all():
        return as_integers(column)
    return column


RUNS_COLUMNS = ["phase", "state", "n_runs"]


def tidy_runs(counts: pd.DataFrame) -> pd.DataFrame:
    """``StudyData.state_counts()`` (phases x states, wide) in long form: one row per phase x state."""
    if counts.empty:
        return pd.DataFrame({c: pd.Series(dtype="Int64" if c == "n_runs" else object) for c in RUNS_COLUMNS})
    long = counts.set_index("phase")[list(STATES)].stack(future_stack=True)  # phase by phase, states in order
    long = long.rename("n_runs").rename_axis(["phase", "state"]).reset_index()
    return long.assign(n_runs=as_integers(long["n_runs"]))[RUNS_COLUMNS].reset_index(drop=True)


ARM_IDENTITY = ["protocol", "budget", "family", "arch", "depth"]
LOAD = ["time_measurement", "cpu_share_min", "cpu_share_max", "load_per_cpu_max"]
ARMS_COLUMNS = [*ARM_IDENTITY, "split", "n_seeds", *BPC, "equal_time_s", "n_no_eval_before_equal_time", "num_params",
                "n_configs", "config_hash", "tokens_per_s_mean", "train_time_s_mean", *LOAD, "n_runs", *OUTCOME_COUNTS,
                "config_not_learned", "excluded", "stop_reasons", "code_versions"]
ARMS_INTEGERS = ["budget", "depth", "n_seeds", "n_no_eval_before_equal_time", "num_params", "n_configs", "n_runs",
                 *OUTCOME_COUNTS, "config_not_learned"]


def tidy_arms(arms: pd.DataFrame) -> pd.DataFrame:
    """``dashboards.stats.arm_table`` in long form: one row per arm x split, valid then test, then
    ``test_closers`` (closer BPC) in a study that recorded the long-range probe, then ``valid_equal_time``
    (valid BPC at T*, with ``equal_time_s`` and ``n_no_eval_before_equal_time``) where runs have an epoch history.

    The arm's own facts (parameters, speed, run counts, exclusions) repeat on its rows."""
    probed, timed = has_probe(arms), has_equal_time(arms)
    rows = []
    for _, arm in arms.iterrows():
        shared = {c: arm[c] for c in ARMS_COLUMNS if c in arm.index}
        shared.update(tokens_per_s_mean=arm["tokens_per_s"], train_time_s_mean=arm["train_time_s"],
                      equal_time_s=np.nan, n_no_eval_before_equal_time=pd.NA)
        splits = [("valid", "valid", "n_seeds"), ("test", "test", "n_test")]
        if probed:
            splits.append(("test_closers", "closer", "n_closer"))
        if timed:
            splits.append(("valid_equal_time", "equal_time", "n_equal_time"))
        for split, key, n in splits:
            row = {**shared, "split": split, "n_seeds": arm[n], "bpc_mean": arm[f"{key}_mean"],
                   BPC[1]: arm[f"{key}_low"], BPC[2]: arm[f"{key}_high"]}
            if split == "valid_equal_time":
                row.update(equal_time_s=arm["equal_time_s"],
                           n_no_eval_before_equal_time=arm["n_no_eval_before_equal_time"])
            rows.append(row)
    table = pd.DataFrame(rows, columns=ARMS_COLUMNS)
    for column in ARMS_INTEGERS:
        table[column] = as_integers(table[column])
    return table


DIFF = ["nested_minus_other_bpc_mean", f"nested_minus_other_bpc_{CI}_low", f"nested_minus_other_bpc_{CI}_high"]
BOOT = f"boot{round(CONFIDENCE * 100)}"  # a percentile-bootstrap interval: boot95
IMPROVEMENT = ["p_nested_better", f"p_nested_better_{BOOT}_low", f"p_nested_better_{BOOT}_high", "n_common_seeds",
               "n_unpaired_seeds"]
COMPARISONS_COLUMNS = ["protocol", "budget", "split", "nested_family", "other_family", "test", "n_pairs",
                       "n_seeds_nested", "n_seeds_other", *DIFF, "t_statistic", "t_df", "p_value", *IMPROVEMENT,
                       "equal_time_s", *LOAD, "excluded", "verdict"]


def tidy_comparisons(comparisons: list[Comparison]) -> pd.DataFrame:
    """One row per comparison x split (``dashboards.stats.paired_comparisons``), the difference signed
    nested - other (negative: the Nested LSTM has the lower, better BPC)."""
    table = pd.DataFrame([{
        "protocol": c.protocol, "budget": c.budget, "split": SPLIT[c.metric], "nested_family": c.nested,
        "other_family": c.other, "test": c.test, "n_pairs": c.n_nested if c.test == PAIRED else None,
        "n_seeds_nested": c.n_nested, "n_seeds_other": c.n_other, DIFF[0]: c.diff.mean, DIFF[1]: c.diff.low,
        DIFF[2]: c.diff.high, "t_statistic": c.t, "t_df": c.df, "p_value": c.p,
        **_improvement(c), "equal_time_s": c.equal_time_s, **_load(c), "excluded": c.excluded,
        "verdict": c.verdict,
    } for c in comparisons], columns=COMPARISONS_COLUMNS)
    for column in ("budget", "n_pairs", "n_seeds_nested", "n_seeds_other", "n_common_seeds", "n_unpaired_seeds"):
        table[column] = as_integers(table[column])
    return table


def _improvement(c: Comparison) -> dict:
    i = c.improvement
    if i is None:
        return dict.fromkeys(IMPROVEMENT, np.nan)
    return dict(zip(IMPROVEMENT, (i.share, i.low, i.high, i.n_pairs, i.n_unpaired), strict=True))


def _load(c: Comparison) -> dict:
    """The machine-load check of an equal-time comparison's runs (both arms); empty on the other splits."""
    if c.load is None:
        return {"time_measurement": "", "cpu_share_min": np.nan, "cpu_share_max": np.nan, "load_per_cpu_max": np.nan}
    return {"time_measurement": c.load.status, "cpu_share_min": c.load.cpu_share_min,
            "cpu_share_max": c.load.cpu_share_max, "load_per_cpu_max": c.load.load_per_cpu_max}


def tidy_expected_best(table: pd.DataFrame) -> pd.DataFrame:
    """``dashboards.expected_best.expected_best_table`` as written (its columns are the CSV's)."""
    from dashboards.expected_best import COLUMNS

    out = table.reindex(columns=COLUMNS).reset_index(drop=True)
    out["n_trials"] = as_integers(out["n_trials"])
    return out


def tidy_configs(configs: pd.DataFrame) -> pd.DataFrame:
    """``dashboards.stats.config_table`` in long form: one row per configuration x split."""
    factors = [c for c in configs.columns if c.startswith("factor.")]
    columns = ["protocol", "budget", "family", "config_hash", *factors, "split", "n_seeds", *BPC, "excluded",
               "represents_arm"]
    rows = []
    for _, config in configs.iterrows():
        shared = {c: config[c] for c in ["protocol", "budget", "family", "config_hash", *factors, "excluded"]}
        for split, n in (("valid", "n_seeds"), ("test", "n_test")):
            rows.append({**shared, "split": split, "n_seeds": config[n], "bpc_mean": config[f"{split}_mean"],
                         BPC[1]: config[f"{split}_low"], BPC[2]: config[f"{split}_high"],
                         "represents_arm": bool(config["selected"])})
    table = pd.DataFrame(rows, columns=columns)
    for column in ("budget", "n_seeds"):
        table[column] = as_integers(table[column])
    for column in factors:
        table[column] = _whole_numbers_as_integers(table[column])
    return table


EXCLUDED_COLUMNS = ["run_name", "phase", "budget", "family", "seed", "outcome", "outcome_reason"]


def tidy_excluded(excluded: pd.DataFrame) -> pd.DataFrame:
    """The runs left out of every statistic (``dashboards.report.excluded_frame``), one row each."""
    table = excluded.reindex(columns=EXCLUDED_COLUMNS).reset_index(drop=True)
    for column in ("budget", "seed"):
        table[column] = as_integers(table[column])
    return table


TIMESCALE_COLUMNS = ["phase", "family", "arch", "depth", "budget", "seed", "run_id", "outcome", "level",
                     "timescale_steps", "mean_abs_step_change"]


def tidy_timescales(judged: pd.DataFrame) -> pd.DataFrame:
    """Every trial run's memory timescales (``timescale_l{k}``, ``step_change_l{k}``), one row per run x level
    (NLSTM: 0 = outer memory; stacked: 0 = bottom layer), with the run's phase and outcome so that a reader
    can keep to the runs the statistics use (outcome ``learned`` in the analysed phases)."""
    if judged.empty:
        return pd.DataFrame(columns=TIMESCALE_COLUMNS)
    frame = timescale_frame(judged).rename(columns={"timescale": "timescale_steps",
                                                    "step_change": "mean_abs_step_change"})
    frame = frame.merge(judged[["run_id", "phase", "outcome"]].drop_duplicates("run_id"), on="run_id", how="left")
    table = frame.reindex(columns=TIMESCALE_COLUMNS)
    for column in ("depth", "budget", "seed", "level"):
        table[column] = as_integers(table[column])
    return table.sort_values(["phase", "budget", "family", "level", "seed"], kind="stable").reset_index(drop=True)
