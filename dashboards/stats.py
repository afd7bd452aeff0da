"""Statistics over seeds: per-arm means with 95 % t-intervals, paired differences, and verdicts.

Methods (the report states them too):
- An *arm* is a family (``nlstm-d2``, ``stacked-d2``, ``single-d1``, ...) at a parameter budget.
  When an arm has several configurations (the evaluate phase re-runs the top-k, an ablation grid
  varies other factors), the arm is represented by the configuration with the lowest mean
  validation BPC; selection uses validation only, so its test BPC stays an honest estimate.
- Interval: the two-sided Student-t interval of the mean over seeds, ``mean +- t(0.975, n-1) s/sqrt(n)``.
- Paired difference: ``nested - other`` per seed, over the seeds completed in both arms, with the
  t-interval of the differences and a two-sided **paired t-test** (``scipy.stats.ttest_rel``).
  Negative means the Nested LSTM has the lower (better) BPC. No correction for multiple comparisons.
- Verdict: a winner is named only with at least :data:`MIN_SEEDS` pairs and a 95 % interval of the
  difference that excludes 0; otherwise the sentence says why no winner is declared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
MIN_SEEDS = 3
FINAL_PHASES = ("evaluate", "ablation")
METRICS = {"test_bpc": "test BPC", "best_valid_bpc": "valid BPC"}
TEST_NAME = "paired t-test (two-sided, scipy.stats.ttest_rel)"
ARCH_ORDER = {"nlstm": 0, "stacked": 1, "single": 2}


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval of the finite ``values`` (NaN bounds when n < 2)."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def t_errorbar(values) -> tuple[float, float]:
    """The t-interval as seaborn's ``errorbar=`` callable wants it (so figures and tables agree)."""
    ci = t_interval(values)
    return (ci.low, ci.high) if ci.n >= 2 else (ci.mean, ci.mean)


def family_key(family: str) -> tuple[int, int, str]:
    arch, _, depth = str(family).partition("-d")
    return (ARCH_ORDER.get(arch, 9), int(depth) if depth.isdigit() else 0, str(family))


def sorted_families(families) -> list[str]:
    return sorted({str(f) for f in families if pd.notna(f)}, key=family_key)


def format_budget(budget: float) -> str:
    if budget is None or not np.isfinite(budget):
        return "n/a"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if budget >= scale:
            return f"{budget / scale:.4g}{suffix}"
    return f"{budget:.4g}"


# ---------------------------------------------------------------------------- which runs count
@dataclass
class AnalysisSet:
    """The completed runs the statistics use, and a sentence saying which and why."""

    runs: pd.DataFrame  # completed runs of the phases used, every configuration
    selected: pd.DataFrame  # the same, restricted to each arm's representative configuration
    phases: list[str]
    note: str


def analysis_set(trials: pd.DataFrame) -> AnalysisSet:
    """Completed runs of the evaluate/ablation phases; the search phase when nothing else has finished yet."""
    if trials.empty:
        empty = trials.iloc[0:0]
        return AnalysisSet(empty, empty, [], "No trial runs have been recorded yet.")
    done = trials[(trials["state"] == "completed") & np.isfinite(trials["best_valid_bpc"].astype(float))]
    final = done[done["phase"].isin(FINAL_PHASES)]
    if not final.empty:
        phases = [p for p in FINAL_PHASES if p in set(final["phase"])]
        note = (f"Statistics use the {len(final)} completed runs of the {' and '.join(phases)} phase"
                f"{'s' if len(phases) > 1 else ''} (fresh seeds per configuration).")
        runs = final
    else:
        runs = done[done["phase"] == "search"] if (done["phase"] == "search").any() else done
        phases = sorted(set(runs["phase"].dropna()))
        note = ("No evaluate or ablation runs have completed yet, so the statistics use the "
                f"{len(runs)} completed search trials: each arm is its best-on-validation configuration, "
                "usually a single run, so intervals and verdicts are mostly unavailable.") if len(runs) else (
                "No trial run has completed yet.")
    return AnalysisSet(runs.reset_index(drop=True), select_arm_configs(runs), phases, note)


def select_arm_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Keep, per (family, budget), the configuration with the lowest mean validation BPC (ties: more seeds)."""
    if runs.empty:
        return runs.assign(n_configs=pd.Series(dtype="int64"))
    key = runs["config_hash"].fillna(runs["run_id"])
    runs = runs.assign(_config=key)
    per_config = (runs.groupby(["family", "budget", "_config"], dropna=False)["best_valid_bpc"]
                  .agg(["mean", "count"]).reset_index())
    per_config = per_config.sort_values(["mean", "count"], ascending=[True, False], kind="stable")
    n_configs = per_config.groupby(["family", "budget"], dropna=False)["_config"].nunique().rename("n_configs")
    best = per_config.drop_duplicates(["family", "budget"])[["family", "budget", "_config"]]
    chosen = runs.merge(best, on=["family", "budget", "_config"], how="inner")
    chosen = chosen.merge(n_configs.reset_index(), on=["family", "budget"], how="left")
    return chosen.drop(columns="_config").reset_index(drop=True)


# ---------------------------------------------------------------------------- tables
def arm_table(selected: pd.DataFrame) -> pd.DataFrame:
    """One row per arm (family x budget): seeds, parameters, valid/test BPC mean and 95 % CI, tokens/s."""
    columns = ["budget", "family", "arch", "depth", "n_seeds", "n_configs", "num_params",
               "valid_mean", "valid_low", "valid_high", "test_mean", "test_low", "test_high", "n_test",
               "tokens_per_s", "train_time_s", "config_hash"]
    rows = []
    for (budget, family), group in selected.groupby(["budget", "family"], dropna=False, sort=False):
        valid, test = t_interval(group["best_valid_bpc"]), t_interval(group["test_bpc"])
        rows.append({
            "budget": budget, "family": family, "arch": group["arch"].iloc[0], "depth": group["depth"].iloc[0],
            "n_seeds": int(group["seed"].nunique()) if group["seed"].notna().any() else len(group),
            "n_configs": int(group["n_configs"].iloc[0]) if "n_configs" in group else 1,
            "num_params": float(group["num_params"].mean()),
            "valid_mean": valid.mean, "valid_low": valid.low, "valid_high": valid.high,
            "test_mean": test.mean, "test_low": test.low, "test_high": test.high, "n_test": test.n,
            "tokens_per_s": float(group["tokens_per_s"].mean()), "train_time_s": float(group["train_time_s"].mean()),
            "config_hash": group["config_hash"].iloc[0],
        })
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    table["_order"] = table["family"].map(family_key)
    return table.sort_values(["budget", "_order"], kind="stable").drop(columns="_order").reset_index(drop=True)


def config_table(runs: pd.DataFrame, selected: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration of the analysed phases, with its factors and whether it represents its arm."""
    if runs.empty:
        return pd.DataFrame()
    key = runs["config_hash"].fillna(runs["run_id"])
    chosen = set(selected["config_hash"].fillna(selected["run_id"]))
    factors = [c for c in runs.columns if c.startswith("factor.")]
    rows = []
    for config, group in runs.assign(_config=key).groupby("_config", sort=False):
        valid, test = t_interval(group["best_valid_bpc"]), t_interval(group["test_bpc"])
        first = group.iloc[0]
        row = {"phase": ", ".join(sorted(set(group["phase"].dropna()))), "family": first["family"],
               "budget": first["budget"], "config_hash": config}
        row.update({f: first[f] for f in factors})
        row.update({"n_seeds": len(group), "valid_mean": valid.mean, "valid_low": valid.low, "valid_high": valid.high,
                    "test_mean": test.mean, "test_low": test.low, "test_high": test.high,
                    "selected": config in chosen})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["_order"] = table["family"].map(family_key)
    return table.sort_values(["budget", "_order", "valid_mean"], kind="stable").drop(columns="_order").reset_index(
        drop=True)


@dataclass(frozen=True)
class Comparison:
    budget: float
    nested: str
    other: str
    metric: str
    n: int
    diff: Interval
    t: float
    p: float
    verdict: str


def _per_seed(selected: pd.DataFrame, family: str, budget: float, metric: str) -> pd.Series:
    rows = selected[(selected["family"] == family) & _same_budget(selected["budget"], budget)]
    rows = rows[np.isfinite(rows[metric].astype(float)) & rows["seed"].notna()]
    return rows.groupby("seed")[metric].mean()


def _same_budget(column: pd.Series, budget: float) -> pd.Series:
    return column.isna() if pd.isna(budget) else column == budget


def paired_comparisons(selected: pd.DataFrame, arms: pd.DataFrame | None = None) -> list[Comparison]:
    """``nlstm-dD - stacked-dD`` and ``nlstm-dD - single-d1`` at each budget, paired by seed, for test and valid BPC."""
    arms = arm_table(selected) if arms is None else arms
    out = []
    for budget in pd.unique(arms["budget"]):
        at_budget = arms[_same_budget(arms["budget"], budget)]
        families = sorted_families(at_budget["family"])
        for nested in (f for f in families if f.startswith("nlstm-")):
            depth = nested.removeprefix("nlstm-d")
            others = [f for f in families if f == f"stacked-d{depth}"] + [f for f in families if f.startswith("single")]
            for other in others:
                for metric, label in METRICS.items():
                    a, b = _per_seed(selected, nested, budget, metric), _per_seed(selected, other, budget, metric)
                    if a.empty and b.empty:
                        continue  # e.g. search trials, which may have no test BPC
                    seeds = a.index.intersection(b.index)
                    diff = t_interval(a[seeds] - b[seeds])
                    t_stat, p = math.nan, math.nan
                    if len(seeds) >= 2 and diff.sd > 0:
                        res = stats.ttest_rel(a[seeds].to_numpy(float), b[seeds].to_numpy(float))
                        t_stat, p = float(res.statistic), float(res.pvalue)
                    arm_a, arm_b = t_interval(a), t_interval(b)
                    text = verdict(nested, other, budget, label, diff, p, arm_a, arm_b)
                    out.append(Comparison(budget, nested, other, metric, len(seeds), diff, t_stat, p, text))
    return out


def comparison_table(comparisons: list[Comparison]) -> pd.DataFrame:
    columns = ["budget", "comparison", "metric", "n_pairs", "diff_mean", "diff_low", "diff_high", "t", "p", "test"]
    return pd.DataFrame([{
        "budget": c.budget, "comparison": f"{c.nested} - {c.other}", "metric": METRICS[c.metric], "n_pairs": c.n,
        "diff_mean": c.diff.mean, "diff_low": c.diff.low, "diff_high": c.diff.high, "t": c.t, "p": c.p,
        "test": "paired t-test",
    } for c in comparisons], columns=columns)


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if np.isfinite(x) else "n/a"


def verdict(nested: str, other: str, budget: float, metric: str, diff: Interval, p: float,
            arm_a: Interval | None = None, arm_b: Interval | None = None) -> str:
    """One plain sentence; it names a winner only when the paired evidence allows it."""
    where = f"at budget {format_budget(budget)}"
    if diff.n == 0:
        return (f"{nested} vs {other} {where} ({metric}): no seed has completed in both arms, so they cannot be "
                "compared yet.")
    if diff.n < MIN_SEEDS:
        return (f"{nested} vs {other} {where} ({metric}): too few paired seeds (n = {diff.n}, at least {MIN_SEEDS} "
                f"needed; mean difference {_fmt(diff.mean)} BPC), so no winner is declared.")
    p_text = f"p = {p:.3g}" if np.isfinite(p) else "p undefined: identical differences"
    detail = (f"{nested} - {other} = {_fmt(diff.mean)} BPC, 95 % CI [{_fmt(diff.low)}, {_fmt(diff.high)}] "
              f"({TEST_NAME.split(' (')[0]}, {p_text}, n = {diff.n} seeds)")
    if diff.covers(0.0):
        return (f"No clear difference between {nested} and {other} {where} ({metric}): {detail}; the interval "
                "includes 0, so no winner is declared.")
    winner, loser = (nested, other) if diff.mean < 0 else (other, nested)
    sentence = f"{winner} has a lower {metric} than {loser} {where}: {detail}."
    if arm_a is not None and arm_b is not None and arm_a.n >= 2 and arm_b.n >= 2 and (
            arm_a.low <= arm_b.high and arm_b.low <= arm_a.high):
        sentence += (" The two arms' own 95 % intervals overlap, so the edge shows only when runs are paired by "
                     "seed; treat it as tentative.")
    return sentence
