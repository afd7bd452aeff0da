"""Statistics over seeds: per-arm means with 95 % t-intervals, differences between arms, and verdicts.

Methods (the report states them too):
- Only runs that *learned* enter a statistic (:mod:`dashboards.outcome`): a run that diverged, failed,
  was pruned, or finished with a validation/test BPC not below chance (the corpus's unigram entropy,
  else log2 of the vocabulary) is excluded, and counted per arm in every table and verdict.
- A *protocol* is one phase's way of training: its seeds and its training budget (epochs, steps per
  epoch). ``ptb.yaml``'s evaluate phase trains seeds 1-5, its ablation seeds 11-13, so their runs are
  never pooled, paired or compared with each other.
- An *arm* is a family (``nlstm-d2``, ``stacked-d2``, ``single-d1``, ...) at a parameter budget within
  one protocol. When it has several configurations (top-k evaluation, other ablation factors), the arm
  is represented by one of them: a configuration in which every finished run learned if there is one,
  then the lowest mean validation BPC; selection uses validation only, so its test BPC stays honest.
- Interval of an arm: the two-sided Student-t interval of the mean over seeds (``scipy.stats.t.interval``),
  shown only where the data support it (:func:`supported`): at least :data:`MIN_INTERVAL_N` seeds and both
  bounds within the metric's range (BPC >= 0); otherwise the mean and its n.
- Difference ``nested - other`` within a protocol and budget. When both arms have learned on exactly
  the same seeds, the runs are paired by seed: paired t-test (``scipy.stats.ttest_rel``) and the
  t-interval of the per-seed differences. Otherwise (a seed excluded in one arm only, different
  seeds) the seeds are not truly paired: Welch's t-test over all seeds of both arms
  (``scipy.stats.ttest_ind(equal_var=False)``) and its interval of the difference of means.
  Negative means the Nested LSTM has the lower (better) BPC. No correction for multiple comparisons. Beside it,
  the probability of improvement over the common seeds (:mod:`dashboards.improvement`).
- Equal training time (:mod:`dashboards.equal_time`): per protocol and budget, T* is the smallest final
  cumulative training time among the selected runs; each run's valid BPC at T* is the linear interpolation of its
  (train_time_s, valid_bpc) epoch history, NaN when T* precedes its first evaluation (counted per arm, never
  extrapolated). It is compared like the other metrics, where recorded.
- Verdict: a winner is named only when both arms learned, with at least :data:`MIN_SEEDS` seeds
  (pairs) per arm, a 95 % interval of the difference that excludes 0, and no run of the winner's
  configuration that did not learn (its surviving seeds would be a biased sample); otherwise the
  sentence says why no winner is declared. Every verdict lists each arm's excluded runs. A named winner's
  sentence goes on to say what the difference means given how the runs stopped
  (:func:`dashboards.stop_reason.ending_sentence`: "ends better" only when every run stopped at its plateau
  and both families were tuned with the same number of search trials).
- Times (tokens/s, training time, valid BPC at T*) carry whether the runs had their CPUs
  (:mod:`dashboards.machine_load`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dashboards.improvement import Improvement, probability_of_improvement
from dashboards.machine_load import LoadCheck, check_load
from dashboards.outcome import EXCLUDED, LEARNED, NOT_LEARNED, OUTCOMES, RUNNING, classify_runs, exclusion_text
from dashboards.search_trials import search_trials
from dashboards.stop_reason import describe_counts, ending_sentence, stop_counts, tuning_gap
from study.record.layout import ARCHS, CHANCE_MARGIN_BITS

CONFIDENCE = 0.95
MIN_SEEDS = 3
MIN_INTERVAL_N = 3  # fewer values: no interval is shown (supported)
FINAL_PHASES = ("evaluate", "ablation")
PHASE_ORDER = {"evaluate": 0, "ablation": 1, "search": 2}
EQUAL_TIME = "valid_bpc_equal_time"  # valid BPC at equal training time T* (dashboards.equal_time adds it to selected)
EQUAL_TIME_S = "equal_time_s"  # T*, seconds, per protocol and budget
# compared between arms where recorded; closer_bpc: the long-range probe of the synthetic corpus (nlstm.probes)
METRICS = {"test_bpc": "test BPC", "best_valid_bpc": "valid BPC", "closer_bpc": "closer BPC",
           EQUAL_TIME: "valid BPC at equal training time"}
PAIRED, WELCH, NO_TEST = "paired t-test", "Welch's t-test", "none"
TEST_NAME = "paired t-test (two-sided, scipy.stats.ttest_rel)"
WELCH_NAME = "Welch's t-test (two-sided, scipy.stats.ttest_ind with equal_var=False)"
ARCH_ORDER = {arch: i for i, arch in enumerate(ARCHS)}
TRAINING_BUDGET = ("epochs", "max_steps_per_epoch", "max_train_tokens")  # params that set how long a run trains
DATA_FACTORS = ("dependency_length",)  # params that give a run another corpus (study.spec.schema.DATA_PARAMS)
PROBE_MARGIN_BITS = 0.1  # below the no-memory bound by this much: the dependency was learned (the trainer's margin)
ARM = ["protocol", "budget", "family"]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int
    sd: float

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def _finite(values) -> np.ndarray:
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce"), dtype=float)
    return x[np.isfinite(x)]


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval of the finite ``values`` (NaN bounds when n < 2)."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1, math.nan)
    sd = float(x.std(ddof=1))
    if sd == 0:  # scipy needs a positive scale; identical values have a zero-width interval
        return Interval(mean, mean, mean, n, 0.0)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(x))
    return Interval(mean, float(low), float(high), n, sd)


def supported(ci: Interval, lower: float = 0.0, upper: float = math.inf) -> Interval:
    """``ci`` with NaN bounds where the data cannot support an interval: fewer than :data:`MIN_INTERVAL_N`
    values (a t-interval over 2 seeds has t = 12.7 and says little but its width), or a bound outside the
    metric's range [``lower``, ``upper``] (a negative BPC): the table then shows the mean and n alone, never
    ``2.647 [-0.654, 5.948]``."""
    if ci.n < MIN_INTERVAL_N or not (np.isfinite(ci.low) and np.isfinite(ci.high)) \
            or ci.low < lower or ci.high > upper:
        return Interval(ci.mean, math.nan, math.nan, ci.n, ci.sd)
    return ci


def bpc_interval(values) -> Interval:
    """:func:`t_interval` of a BPC (at least 0), :func:`supported` only."""
    return supported(t_interval(values), lower=0.0)


def t_errorbar(values) -> tuple[float, float]:
    """The BPC t-interval as seaborn's ``errorbar=`` callable wants it (so figures and tables agree): no bar
    where the tables show no interval (:func:`supported`)."""
    ci = bpc_interval(values)
    return (ci.low, ci.high) if np.isfinite(ci.low) else (ci.mean, ci.mean)


def t_errorbar_signed(values) -> tuple[float, float]:
    """As :func:`t_errorbar` for a difference (any sign)."""
    ci = supported(t_interval(values), lower=-math.inf)
    return (ci.low, ci.high) if np.isfinite(ci.low) else (ci.mean, ci.mean)


FAMILY = re.compile(r"^(?P<arch>[a-z]+)-d(?P<depth>\d+)(?:-(?P<variant>.+))?$")


def family_parts(family: str) -> tuple[str, int, str]:
    """``nlstm-d2-tanh`` -> ``("nlstm", 2, "tanh")``; ``stacked-d2`` -> ``("stacked", 2, "")``. The family tag
    names the outer candidate of a nested model when it is not the identity (study.record.layout.FAMILY_TAG)."""
    match = FAMILY.match(str(family))
    if not match:
        return str(family), 0, ""
    return match["arch"], int(match["depth"]), match["variant"] or ""


def family_line(family: str) -> str:
    """The family without its depth: ``nlstm``, ``nlstm-tanh``, ``stacked``, ``single`` (one line over depths)."""
    arch, _, variant = family_parts(family)
    return f"{arch}-{variant}" if variant else arch


def family_key(family: str) -> tuple[int, int, str, str]:
    arch, depth, variant = family_parts(family)
    return (ARCH_ORDER.get(arch, 9), depth, variant, str(family))


def sorted_families(families) -> list[str]:
    return sorted({str(f) for f in families if pd.notna(f)}, key=family_key)


def protocol_key(protocol: str) -> tuple[int, tuple[tuple[int, str], ...]]:
    """Phase order, then natural order (``dependency_length 40`` before ``160``)."""
    text = str(protocol)
    parts = tuple((0, f"{int(p):012d}") if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text) if p)
    return (PHASE_ORDER.get(text.split(",")[0], 9), parts)


def format_budget(budget: float) -> str:
    if budget is None or not np.isfinite(budget):
        return "n/a"
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if budget >= scale:
            return f"{budget / scale:.4g}{suffix}"
    return f"{budget:.4g}"


def same_value(column: pd.Series, value: Any) -> pd.Series:
    """``column == value``, where a missing value matches missing entries (a budget never recorded)."""
    return column.isna() if pd.isna(value) else column == value


# ---------------------------------------------------------------------------- which runs count
def with_protocol(trials: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with a ``protocol`` column: the phase, plus the training budget or the corpus variant when runs
    of one phase differ in it (an ablation factor over epochs or dependency_length, say), e.g.
    ``"ablation, epochs 20"``: runs trained for other lengths or on other data are never compared."""
    label = trials["phase"].fillna("?").astype(str)
    keys = [k for k in (*TRAINING_BUDGET, *DATA_FACTORS) if k in trials]
    for _, group in trials.groupby(label, sort=False):
        # A run that failed before logging its params has no budget: it belongs to its phase's only one, if single.
        for key in (k for k in keys if group[k].dropna().map(_budget_value).nunique() > 1):
            label[group.index] += f", {key} " + group[key].map(_budget_value)
    return trials.assign(protocol=label)


def _budget_value(value: Any) -> str:
    if pd.isna(value):
        return "unknown"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@dataclass
class AnalysisSet:
    """The runs the statistics look at, each with its outcome, and a sentence saying which and why."""

    trials: pd.DataFrame  # every trial run, with outcome, outcome_reason, chance_bpc, chance_source, protocol
    runs: pd.DataFrame  # the runs of the phases analysed, every outcome
    selected: pd.DataFrame  # learned runs of each arm's representative configuration (one protocol per arm)
    phases: list[str]
    note: str

    @property
    def learned(self) -> pd.DataFrame:
        return self.runs[self.runs["outcome"] == LEARNED]


def analysis_set(trials: pd.DataFrame, parent_params: dict[str, Any] | None = None) -> AnalysisSet:
    """The evaluate/ablation phases once any of their runs has finished; the search phase until then."""
    judged = with_protocol(classify_runs(trials, parent_params)) if not trials.empty else trials.assign(
        outcome=pd.Series(dtype=object), outcome_reason=pd.Series(dtype=object), protocol=pd.Series(dtype=object),
        chance_bpc=pd.Series(dtype=float), chance_source=pd.Series(dtype=object))
    if judged.empty:
        return AnalysisSet(judged, judged, judged, [], "No trial runs have been recorded yet.")
    finished = judged[judged["outcome"] != RUNNING]
    final = finished[finished["phase"].isin(FINAL_PHASES)]
    if not final.empty:
        phases = [p for p in FINAL_PHASES if p in set(final["phase"])]
        runs = judged[judged["phase"].isin(phases)]
        n_learned = int((runs["outcome"] == LEARNED).sum())
        note = (f"Statistics use the {n_learned} runs that learned of the {' and '.join(phases)} phase"
                f"{'s' if len(phases) > 1 else ''} (fresh seeds per configuration), each phase on its own: runs "
                "of different phases (seeds, epochs) are never pooled or compared.")
    else:
        runs = judged[judged["phase"] == "search"] if (judged["phase"] == "search").any() else judged
        phases = sorted(set(runs["phase"].dropna()))
        n_learned = int((runs["outcome"] == LEARNED).sum())
        note = ("No evaluate or ablation runs have finished yet, so the statistics use the "
                f"{n_learned} search trials that learned: each arm is its best-on-validation configuration, "
                "usually a single run, so intervals and verdicts are mostly unavailable.") if n_learned else (
                "No trial run has learned yet.")
    runs = runs.reset_index(drop=True)
    return AnalysisSet(judged, runs, select_arm_configs(runs), phases, note + _bar_sentence(runs))


def _bar_sentence(runs: pd.DataFrame) -> str:
    finished = runs[runs["outcome"].isin([LEARNED, NOT_LEARNED])]
    if finished.empty:
        return ""
    sources = finished.groupby("chance_source")["chance_bpc"].agg(["min", "max"])
    known = [f"{lo:.3f}" + (f"-{hi:.3f}" if hi > lo else "") + f" bits ({src})"
             for src, (lo, hi) in sources.iterrows() if src != "unknown"]
    text = (f" A run learned if its valid and test BPC are at least {CHANCE_MARGIN_BITS:g} bit below chance "
            f"(study.record.layout.below_chance): {'; '.join(known)}." if known else "")
    if any(src.startswith("log2(vocabulary") for src in sources.index):
        text += (" Where a run records no unigram entropy, chance is log2 of the vocabulary, an upper bound of the "
                 "entropy: a more lenient bar.")
    unknown = int((finished["chance_source"] == "unknown").sum())
    if unknown:
        text += (f" For {unknown} run{'s' if unknown > 1 else ''} the store records neither the corpus's unigram "
                 "entropy nor its vocabulary, so only failures and non-finite BPC could exclude them.")
    return text


def _config_key(runs: pd.DataFrame) -> pd.Series:
    return runs["config_hash"].fillna(runs["run_id"])


def select_arm_configs(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm (protocol, budget, family): the learned runs of its representative configuration, with
    ``n_configs`` (configurations of the arm) and ``config_not_learned`` (its runs that did not learn)."""
    learned = runs[runs["outcome"] == LEARNED]
    if learned.empty:
        return learned.assign(n_configs=pd.Series(dtype="int64"), config_not_learned=pd.Series(dtype="int64"))
    runs = runs.assign(_config=_config_key(runs))
    per_config = runs.groupby([*ARM, "_config"], dropna=False).agg(
        mean=("best_valid_bpc", lambda s: s[runs.loc[s.index, "outcome"] == LEARNED].mean()),
        n_learned=("outcome", lambda s: int((s == LEARNED).sum())),
        config_not_learned=("outcome", lambda s: int((s == NOT_LEARNED).sum()))).reset_index()
    n_configs = per_config.groupby(ARM, dropna=False)["_config"].nunique().rename("n_configs").reset_index()
    candidates = per_config[per_config["n_learned"] > 0].assign(_unstable=lambda f: f["config_not_learned"] > 0)
    candidates = candidates.sort_values(["_unstable", "mean", "n_learned"], ascending=[True, True, False],
                                        kind="stable")
    best = candidates.drop_duplicates(ARM)[[*ARM, "_config", "config_not_learned"]]
    chosen = runs[runs["outcome"] == LEARNED].merge(best, on=[*ARM, "_config"], how="inner")
    chosen = chosen.merge(n_configs, on=ARM, how="left")
    return chosen.drop(columns="_config").reset_index(drop=True)


# ---------------------------------------------------------------------------- tables
def _sort_arms(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    order = table.assign(_p=table["protocol"].map(protocol_key), _f=table["family"].map(family_key))
    return order.sort_values(["_p", "budget", "_f"], kind="stable").drop(columns=["_p", "_f"]).reset_index(drop=True)


ARM_COLUMNS = ["protocol", "budget", "family", "arch", "depth", "n_seeds", "n_configs", "num_params",
               "valid_mean", "valid_low", "valid_high", "test_mean", "test_low", "test_high", "n_test",
               "closer_mean", "closer_low", "closer_high", "n_closer", "equal_time_mean", "equal_time_low",
               "equal_time_high", "n_equal_time", "equal_time_s", "n_no_eval_before_equal_time", "tokens_per_s",
               "train_time_s", "time_measurement", "cpu_share_min", "cpu_share_max", "load_per_cpu_max",
               "config_hash", "n_runs", *(f"n_{o.replace(' ', '_')}" for o in OUTCOMES),
               "config_not_learned", "excluded", "stop_reasons", "code_versions"]


def has_probe(arms: pd.DataFrame) -> bool:
    """Whether any arm of ``arm_table`` has closer BPC (the long-range probe was recorded)."""
    return "n_closer" in arms and bool((arms["n_closer"] > 0).any())


def has_equal_time(arms: pd.DataFrame) -> bool:
    """Whether any arm of ``arm_table`` has a T* (its runs have an epoch history: the equal-time view applies)."""
    return "equal_time_s" in arms and bool(arms["equal_time_s"].notna().any())


def arm_table(aset: AnalysisSet) -> pd.DataFrame:
    """One row per arm (protocol x budget x family), also for arms none of whose runs learned: seeds that
    learned, parameters, valid/test BPC mean and 95 % CI, tokens/s, and the runs excluded (how many, why)."""
    rows = []
    for key, arm_runs in aset.runs.groupby(ARM, dropna=False, sort=False):
        protocol, budget, family = key
        group = aset.selected[(aset.selected["protocol"] == protocol) & same_value(aset.selected["budget"], budget)
                              & (aset.selected["family"] == family)]
        valid, test = bpc_interval(group["best_valid_bpc"]), bpc_interval(group["test_bpc"])
        closer = bpc_interval(group["closer_bpc"] if "closer_bpc" in group else [])  # the long-range probe
        at_equal = bpc_interval(group[EQUAL_TIME] if EQUAL_TIME in group else [])
        t_star = equal_time_at(aset.selected, protocol, budget)
        counts = arm_runs["outcome"].value_counts()
        basis = group if len(group) else arm_runs
        load = check_load(group)
        rows.append({
            "protocol": protocol, "budget": budget, "family": family, "arch": arm_runs["arch"].iloc[0],
            "depth": arm_runs["depth"].iloc[0],
            "n_seeds": int(group["seed"].nunique()) if group["seed"].notna().any() else len(group),
            "n_configs": int(_config_key(arm_runs).nunique()), "num_params": float(basis["num_params"].mean()),
            "valid_mean": valid.mean, "valid_low": valid.low, "valid_high": valid.high,
            "test_mean": test.mean, "test_low": test.low, "test_high": test.high, "n_test": test.n,
            "closer_mean": closer.mean, "closer_low": closer.low, "closer_high": closer.high, "n_closer": closer.n,
            "equal_time_mean": at_equal.mean, "equal_time_low": at_equal.low, "equal_time_high": at_equal.high,
            "n_equal_time": at_equal.n, "equal_time_s": t_star,
            "n_no_eval_before_equal_time": len(group) - at_equal.n if np.isfinite(t_star) else 0,
            "tokens_per_s": float(group["tokens_per_s"].mean()) if len(group) else math.nan,
            "train_time_s": float(group["train_time_s"].mean()) if len(group) else math.nan,
            "time_measurement": load.status if len(group) else "", "cpu_share_min": load.cpu_share_min,
            "cpu_share_max": load.cpu_share_max, "load_per_cpu_max": load.load_per_cpu_max,
            "config_hash": group["config_hash"].iloc[0] if len(group) else None, "n_runs": len(arm_runs),
            **{f"n_{o.replace(' ', '_')}": int(counts.get(o, 0)) for o in OUTCOMES},
            "config_not_learned": int(group["config_not_learned"].iloc[0]) if len(group) else 0,
            "excluded": exclusion_text(arm_runs),
            "stop_reasons": describe_counts(stop_counts(group.get("stop_reason", pd.Series(dtype=object)))),
            "code_versions": code_versions_text(arm_runs),
        })
    return _sort_arms(pd.DataFrame(rows, columns=ARM_COLUMNS))


def code_versions_text(runs: pd.DataFrame) -> str:
    """The code versions (tag ``nlstm.code_version``) of ``runs``: ``0.2.0+g1a2b3c4`` when one, else each with its
    run count (``0.2.0+g1a2b3c4 (3), 0.2.0+g5d6e7f8.dirty (2)``); ``not recorded`` for runs without the tag."""
    if "code_version" not in runs or runs.empty:
        return "not recorded"
    versions = runs["code_version"].where(runs["code_version"].notna() & (runs["code_version"] != ""),
                                          "not recorded")
    counts = versions.value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    recorded = sorted(v for v in counts.index if v != "not recorded")
    ordered = recorded + (["not recorded"] if "not recorded" in counts.index else [])
    return ", ".join(f"{v} ({int(counts[v])})" for v in ordered)


def config_table(aset: AnalysisSet) -> pd.DataFrame:
    """One row per configuration of the analysed phases: its factors, learned seeds, exclusions, and whether
    it represents its arm."""
    runs = aset.runs
    if runs.empty:
        return pd.DataFrame()
    chosen = set(_config_key(aset.selected)) if len(aset.selected) else set()
    factors = [c for c in runs.columns if c.startswith("factor.")]
    rows = []
    for (protocol, config), group in runs.assign(_config=_config_key(runs)).groupby(["protocol", "_config"],
                                                                                    sort=False):
        learned = group[group["outcome"] == LEARNED]
        valid, test = bpc_interval(learned["best_valid_bpc"]), bpc_interval(learned["test_bpc"])
        first = group.iloc[0]
        row = {"protocol": protocol, "budget": first["budget"], "family": first["family"], "config_hash": config}
        row.update({f: first[f] for f in factors})
        row.update({"n_seeds": len(learned), "n_test": test.n, "excluded": exclusion_text(group),
                    "valid_mean": valid.mean, "valid_low": valid.low, "valid_high": valid.high,
                    "test_mean": test.mean, "test_low": test.low, "test_high": test.high,
                    "selected": config in chosen})
        rows.append(row)
    table = pd.DataFrame(rows)
    order = table.assign(_p=table["protocol"].map(protocol_key), _f=table["family"].map(family_key))
    order = order.sort_values(["_p", "budget", "_f", "valid_mean"], kind="stable")
    return order.drop(columns=["_p", "_f"]).reset_index(drop=True)


# ---------------------------------------------------------------------------- comparisons
@dataclass(frozen=True)
class ArmRecord:
    """What a verdict needs to know about one arm."""

    family: str
    protocol: str
    n_finished: int
    n_learned: int
    config_not_learned: int  # runs of the representative configuration that did not learn
    excluded: str  # exclusion_text of the arm's runs

    @classmethod
    def of(cls, row: pd.Series) -> ArmRecord:
        finished = int(row["n_learned"] + sum(row[f"n_{o.replace(' ', '_')}"] for o in EXCLUDED))
        return cls(str(row["family"]), str(row["protocol"]), finished, int(row["n_learned"]),
                   int(row["config_not_learned"]), str(row["excluded"]))


@dataclass(frozen=True)
class Comparison:
    protocol: str
    budget: float
    nested: str
    other: str
    metric: str
    test: str  # PAIRED | WELCH | NO_TEST
    n_nested: int  # seeds of each arm in the test (= the pairs for a paired test)
    n_other: int
    diff: Interval  # nested - other: mean and 95 % interval (n: pairs, or n_nested + n_other)
    t: float
    df: float
    p: float
    excluded: str  # "nested: ...; other: ..."
    verdict: str
    equal_time_s: float = math.nan  # T* of the protocol and budget, for the equal-time metric only
    improvement: Improvement | None = None  # P(nested better) over common seeds (dashboards.improvement)
    load: LoadCheck | None = None  # equal-time metric only: did both arms' runs have their CPUs?

    @property
    def n_pairs(self) -> int | None:
        return self.n_nested if self.test == PAIRED else None


def _arm_runs(selected: pd.DataFrame, protocol: str, family: str, budget: float) -> pd.DataFrame:
    return selected[(selected["protocol"] == protocol) & (selected["family"] == family)
                    & same_value(selected["budget"], budget)]


def _compared(selected: pd.DataFrame, protocol: str, family: str, budget: float, metric: str) -> pd.DataFrame:
    rows = _arm_runs(selected, protocol, family, budget)
    return rows[np.isfinite(rows[metric].astype(float)) & rows["seed"].notna()]


def _per_seed(selected: pd.DataFrame, protocol: str, family: str, budget: float, metric: str) -> pd.Series:
    return _compared(selected, protocol, family, budget, metric).groupby("seed")[metric].mean()


def _stops(selected: pd.DataFrame, protocol: str, family: str, budget: float, metric: str):
    """Stop reasons of the runs a comparison of ``metric`` uses (dashboards.stop_reason)."""
    rows = _compared(selected, protocol, family, budget, metric)
    return stop_counts(rows["stop_reason"] if "stop_reason" in rows else [""] * len(rows))


def difference_test(a: pd.Series, b: pd.Series) -> tuple[str, Interval, float, float, float]:
    """(test, interval of nested - other, t, df, p) for two per-seed series (index: seed).

    Identical seed sets are truly paired: paired t-test over them. Anything else is not: Welch's test over all
    seeds. With fewer than 2 seeds (pairs) per side there is no test; the mean difference is still given. With
    fewer than :data:`MIN_INTERVAL_N` pairs (seeds on a side) the interval is not given (:func:`supported`)."""
    test, diff, t_stat, df, p = _difference_test(a, b)
    if min(len(a), len(b)) < MIN_INTERVAL_N:
        diff = Interval(diff.mean, math.nan, math.nan, diff.n, diff.sd)
    return test, diff, t_stat, df, p


def _difference_test(a: pd.Series, b: pd.Series) -> tuple[str, Interval, float, float, float]:
    if len(a) >= 2 and set(a.index) == set(b.index):
        d = (a - b[a.index]).to_numpy(float)
        ci = t_interval(d)
        if ci.sd == 0:
            return PAIRED, ci, math.nan, float(len(d) - 1), math.nan
        res = stats.ttest_rel(a.to_numpy(float), b[a.index].to_numpy(float))
        low, high = res.confidence_interval(CONFIDENCE)
        return PAIRED, Interval(ci.mean, float(low), float(high), len(d), ci.sd), float(res.statistic), \
            float(res.df), float(res.pvalue)
    mean = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return NO_TEST, Interval(mean, math.nan, math.nan, len(a) + len(b), math.nan), math.nan, math.nan, math.nan
    x, y = a.to_numpy(float), b.to_numpy(float)
    if x.std(ddof=1) == 0 and y.std(ddof=1) == 0:
        return WELCH, Interval(mean, mean, mean, len(x) + len(y), 0.0), math.nan, math.nan, math.nan
    res = stats.ttest_ind(x, y, equal_var=False)
    low, high = res.confidence_interval(CONFIDENCE)
    return WELCH, Interval(mean, float(low), float(high), len(x) + len(y), math.nan), float(res.statistic), \
        float(res.df), float(res.pvalue)


def paired_comparisons(aset: AnalysisSet, arms: pd.DataFrame | None = None) -> list[Comparison]:
    """Within each protocol and budget: ``nlstm-dD - stacked-dD`` and ``nlstm-dD - single-d1``, for test and valid
    BPC. A counterpart that exists at the budget only under another protocol gives a 'not compared' entry."""
    arms = arm_table(aset) if arms is None else arms
    found = search_trials(aset.trials)
    tuned, distinct = found.ended, found.distinct.to_dict()
    out = []
    for _, nested_row in arms[arms["arch"] == "nlstm"].iterrows():
        protocol, budget, nested = nested_row["protocol"], nested_row["budget"], nested_row["family"]
        at_budget = arms[same_value(arms["budget"], budget)]
        depth = family_parts(nested)[1]
        wanted = sorted_families(f for f in at_budget["family"] if family_parts(f)[0] == "single"
                                 or (family_parts(f)[0] == "stacked" and family_parts(f)[1] == depth))
        for other in wanted:
            same = at_budget[(at_budget["family"] == other) & (at_budget["protocol"] == protocol)]
            elsewhere = sorted(set(at_budget.loc[at_budget["family"] == other, "protocol"]), key=protocol_key)
            a_arm = ArmRecord.of(nested_row)
            b_arm = ArmRecord.of(same.iloc[0]) if len(same) else None
            for metric, label in METRICS.items():
                if metric == "closer_bpc" and (metric not in aset.runs or aset.runs[metric].isna().all()):
                    continue  # the long-range probe is recorded on the synthetic corpus only
                if metric == EQUAL_TIME and (metric not in aset.selected or aset.selected[metric].isna().all()):
                    continue  # no epoch history, or no run evaluated before T*
                a = _per_seed(aset.selected, protocol, nested, budget, metric)
                b = _per_seed(aset.selected, protocol, other, budget, metric) if b_arm else pd.Series(dtype=float)
                if b_arm and a_arm.n_learned and b_arm.n_learned and a.empty and b.empty:
                    continue  # e.g. search trials, which may have no test BPC
                if b_arm is None:
                    c = Comparison(protocol, budget, nested, other, metric, NO_TEST, len(a), 0, Interval(
                        math.nan, math.nan, math.nan, 0, math.nan), math.nan, math.nan, math.nan,
                        f"{nested}: {a_arm.excluded}", "")
                    text = not_comparable(c, label, elsewhere)
                else:
                    test, diff, t_stat, df, p = difference_test(a, b)
                    c = Comparison(protocol, budget, nested, other, metric, test, len(a), len(b), diff, t_stat, df,
                                   p, f"{nested}: {a_arm.excluded}; {other}: {b_arm.excluded}", "",
                                   improvement=probability_of_improvement(a, b))
                    ending = "" if metric == EQUAL_TIME else ending_sentence(
                        nested, other, c.diff.mean < 0, _stops(aset.selected, protocol, nested, budget, metric),
                        _stops(aset.selected, protocol, other, budget, metric), label,
                        tuning_gap(protocol, nested, other, tuned, distinct))
                    text = verdict(c, label, a_arm, b_arm, _overlap(t_interval(a), t_interval(b)),
                                   bar=_probe_bar(aset.selected) if metric == "closer_bpc" else None,
                                   means=(float(a.mean()), float(b.mean())), ending=ending)
                    if metric == EQUAL_TIME:
                        c = dataclasses.replace(c, load=check_load(pd.concat([
                            _arm_runs(aset.selected, protocol, f, budget) for f in (nested, other)])))
                out.append(dataclasses.replace(c, verdict=text, equal_time_s=equal_time_at(
                    aset.selected, protocol, budget) if metric == EQUAL_TIME else math.nan))
    return out


def equal_time_at(selected: pd.DataFrame, protocol: str, budget: float) -> float:
    """T* of a protocol and budget (``dashboards.equal_time``), NaN where it was not computed."""
    if EQUAL_TIME_S not in selected:
        return math.nan
    rows = selected[(selected["protocol"] == protocol) & same_value(selected["budget"], budget)]
    times = rows[EQUAL_TIME_S].dropna()
    return float(times.iloc[0]) if len(times) else math.nan


def _probe_bar(selected: pd.DataFrame) -> float:
    """Closer BPC a run must beat to have learned the long-range dependency: the no-memory bound
    (``closer_bound_bits``, log2 of the bracket types) less ``PROBE_MARGIN_BITS``; NaN if not recorded."""
    bounds = selected["closer_bound_bits"].dropna() if "closer_bound_bits" in selected else pd.Series(dtype=float)
    return float(bounds.median()) - PROBE_MARGIN_BITS if len(bounds) else math.nan


def _overlap(a: Interval, b: Interval) -> bool:
    return a.n >= 2 and b.n >= 2 and a.low <= b.high and b.low <= a.high


def comparison_table(comparisons: list[Comparison]) -> pd.DataFrame:
    columns = ["protocol", "budget", "comparison", "metric", "test", "n_pairs", "n_nested", "n_other", "diff_mean",
               "diff_low", "diff_high", "t", "df", "p", "improvement", "time_measurement", "excluded"]
    return pd.DataFrame([{
        "protocol": c.protocol, "budget": c.budget, "comparison": f"{c.nested} - {c.other}",
        "metric": METRICS[c.metric], "test": c.test, "n_pairs": c.n_pairs, "n_nested": c.n_nested,
        "n_other": c.n_other, "diff_mean": c.diff.mean, "diff_low": c.diff.low, "diff_high": c.diff.high,
        "t": c.t, "df": c.df, "p": c.p, "improvement": c.improvement.text() if c.improvement else "n/a",
        "time_measurement": c.load.cell() if c.load else "", "excluded": c.excluded,
    } for c in comparisons], columns=columns)


# ---------------------------------------------------------------------------- verdicts
def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}" if np.isfinite(x) else "n/a"


def _where(c: Comparison, metric: str) -> str:
    return f"at budget {format_budget(c.budget)} in protocol \"{c.protocol}\" ({metric})"


def not_comparable(c: Comparison, metric: str, elsewhere: list[str]) -> str:
    return (f"{c.nested} vs {c.other} {_where(c, metric)}: not run under a common protocol ({c.other} only in "
            f"{', '.join(elsewhere)}; different seeds or training budget), so they are not compared and no winner "
            "is declared.")


def _exclusions(nested: ArmRecord, other: ArmRecord) -> str:
    return f" Runs excluded: {nested.family} {nested.excluded}; {other.family} {other.excluded}."


def verdict(c: Comparison, metric: str, nested: ArmRecord, other: ArmRecord, arms_overlap: bool = False,
            bar: float | None = None, means: tuple[float, float] = (math.nan, math.nan), ending: str = "") -> str:
    """One plain sentence (and the arms' exclusions); it names a winner only when the evidence allows it.

    ``bar``: the winner's mean (``means``: nested, other) must be below it, else it learned nothing the
    metric measures (closer BPC at the no-memory bound: both arms forgot the opener, and a difference
    between them is only in how they guess). ``ending`` (:func:`dashboards.stop_reason.ending_sentence`)
    follows a named winner: whether the runs' stop reasons let the difference say where a model ends or only
    how fast it learns."""
    head = f"{c.nested} vs {c.other} {_where(c, metric)}"
    tail = _exclusions(nested, other)
    silent = [a for a in (nested, other) if a.n_learned == 0]
    if silent:
        why = " and ".join(f"{a.family} did not learn in any of its {a.n_finished} finished runs" if a.n_finished
                           else f"{a.family} has no finished run yet" for a in silent)
        return f"{head}: {why}, so no winner is declared.{tail}"
    if c.n_nested == 0 or c.n_other == 0:
        return f"{head}: no seed has a {metric} in both arms, so they cannot be compared yet.{tail}"
    paired = c.test == PAIRED
    seeds = f"n = {c.n_nested} paired seeds" if paired else f"n = {c.n_nested} and {c.n_other} seeds"
    if c.test == NO_TEST or min(c.n_nested, c.n_other) < MIN_SEEDS:
        need = f"at least {MIN_SEEDS} {'paired seeds' if paired else 'seeds per arm'} needed"
        return (f"{head}: too few seeds ({seeds}, {need}; mean difference {_signed(c.diff.mean)} BPC), so no winner "
                f"is declared.{tail}")
    p_text = f"p = {c.p:.3g}" if np.isfinite(c.p) else "p undefined: no spread"
    how = "paired t-test" if paired else "Welch's t-test over all seeds, which are not paired"
    detail = (f"{c.nested} - {c.other} = {_signed(c.diff.mean)} BPC, "
              f"95 % CI [{_signed(c.diff.low)}, {_signed(c.diff.high)}] "
              f"({how}, {p_text}, {seeds})")
    if c.diff.covers(0.0):
        return f"No clear difference: {head}: {detail}; the interval includes 0, so no winner is declared.{tail}"
    winner, loser = (nested, other) if c.diff.mean < 0 else (other, nested)
    winner_mean = means[0] if winner is nested else means[1]
    if bar is not None and np.isfinite(bar) and not winner_mean < bar:
        return (f"{head}: {winner.family} has the lower mean ({detail}), but its mean {metric} {winner_mean:.3f} is "
                f"not below {bar:.3g} (the no-memory bound less {PROBE_MARGIN_BITS} bit): neither arm learned the "
                f"dependency, so no winner is declared.{tail}")
    if winner.config_not_learned:
        return (f"{head}: {winner.family} has the lower mean over the seeds that learned ({detail}), but its "
                f"configuration did not learn in {winner.config_not_learned} of its seeds, so the seeds compared are "
                f"a biased sample and no winner is declared.{tail}")
    sentence = (f"{winner.family} has a lower {metric} than {loser.family} at budget {format_budget(c.budget)} "
                f"in protocol \"{c.protocol}\": {detail}.")
    if ending:
        sentence += " " + ending
    if paired and arms_overlap:
        sentence += (" The two arms' own 95 % intervals overlap, so the edge shows only when runs are paired by "
                     "seed; treat it as tentative.")
    return sentence + tail
