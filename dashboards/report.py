"""Assemble a study's report: ``report.html`` (self-contained, figures inlined as base64 PNG, opens
offline), ``report.md`` with the same tables and the figure files next to it, and CSV tables.

Both documents are rendered from one list of blocks, so they cannot disagree. The report can be
regenerated at any time, also while the study runs: unfinished, pruned and failed runs are
counted and left out of every statistic.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dashboards.efficiency import study_efficiency
from dashboards.equal_time import add_equal_time
from dashboards.expected_best import budget_sentence, expected_best_table, ranking_verdict
from dashboards.figures import FigureResult, all_figures
from dashboards.load import STATES, StudyData
from dashboards.machine_load import CPU_SHARE_MIN, LOAD_PER_CPU_MAX, LoadCheck, add_machine_load, check_load
from dashboards.outcome import EXCLUDED, FAILED, NOT_LEARNED, PRUNED
from dashboards.stats import (
    EQUAL_TIME,
    MIN_INTERVAL_N,
    MIN_SEEDS,
    TEST_NAME,
    WELCH,
    WELCH_NAME,
    AnalysisSet,
    analysis_set,
    arm_table,
    comparison_table,
    config_table,
    format_budget,
    has_equal_time,
    has_probe,
    paired_comparisons,
    same_value,
)
from dashboards.tables import (
    tidy_arms,
    tidy_comparisons,
    tidy_configs,
    tidy_excluded,
    tidy_expected_best,
    tidy_runs,
    tidy_timescales,
    trials_table,
)
from study.record.layout import CHANCE_MARGIN_BITS

FIGURE_DPI = 110


# ---------------------------------------------------------------------------- formatting
def fmt_ci(mean: float, low: float, high: float, n: int | None = None) -> str:
    """``mean [low, high]``; ``mean (n = 2)`` when there are too few values for an interval, and
    ``mean (n = 3; no interval: ...)`` when its bounds would leave the metric's range (``stats.supported``)."""
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(low) and np.isfinite(high)):
        if n is not None and n >= MIN_INTERVAL_N:
            return f"{mean:.3f} (n = {n}; no interval: it would reach below 0)"
        return f"{mean:.3f} (n = {n})" if n is not None else f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def fmt_signed_ci(mean: float, low: float, high: float) -> tuple[str, str]:
    if not np.isfinite(mean):
        return "n/a", "n/a"
    ci = f"[{low:+.3f}, {high:+.3f}]" if np.isfinite(low) and np.isfinite(high) else "n/a"
    return f"{mean:+.3f}", ci


def fmt_int(x: float) -> str:
    return f"{x:,.0f}" if x is not None and np.isfinite(x) else "n/a"


def fmt_seconds(x: float) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def fmt_p(p: float) -> str:
    return f"{p:.3g}" if np.isfinite(p) else "n/a"


# ---------------------------------------------------------------------------- the document
@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class FigureBlock:
    result: FigureResult
    path: str | None = None  # relative to the report folder
    png: bytes | None = None


@dataclass
class Report:
    title: str
    blocks: list = field(default_factory=list)  # ("h2", text) | ("p", text) | ("ul", [text]) | Table | FigureBlock

    def h2(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def p(self, text: str) -> None:
        if text:
            self.blocks.append(("p", text))

    def ul(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))


@dataclass
class ReportFiles:
    out_dir: Path
    html: Path
    markdown: Path
    figures: list[Path]
    tables: list[Path]
    logged_to: str | None = None  # parent run id the report was logged to


def _runs_summary(data: StudyData, aset: AnalysisSet) -> tuple[Table, list[str]]:
    counts = data.state_counts()
    rows = [[str(r["phase"]), *(str(int(r[s])) for s in STATES), str(int(r["total"]))] for _, r in counts.iterrows()]
    if len(counts):
        totals = counts[[*STATES, "total"]].sum()
        rows.append(["all", *(str(int(totals[s])) for s in STATES), str(int(totals["total"]))])
    table = Table("Trial runs per phase and state", ["phase", *STATES, "total"], rows)
    sentences = []
    n = {s: int((data.trials["state"] == s).sum()) for s in STATES} if len(data.trials) else dict.fromkeys(STATES, 0)
    excluded = [f"{n[s]} {s}" for s in ("running", "pruned", "failed") if n[s]]
    if excluded:
        several = sum(n[s] for s in STATES[1:]) > 1
        sentences.append(f"{', '.join(excluded)} run{'s are' if several else ' is'} counted here and left out of "
                         "every statistic below"
                         + (" (a run still marked running may also be one whose driver was killed)."
                            if n["running"] else "."))
    judged = aset.trials
    not_learned = judged[judged["outcome"] == NOT_LEARNED] if len(judged) else judged
    if len(not_learned):
        completed = int((not_learned["state"] == "completed").sum())
        how = [f"{completed} completed with a BPC not below chance or not finite" if completed else "",
               f"{len(not_learned) - completed} failed as diverged or not learning" if completed < len(not_learned)
               else ""]
        sentences.append(f"{len(not_learned)} run{'s' if len(not_learned) > 1 else ''} did not learn "
                         f"({', '.join(h for h in how if h)}): excluded from every statistic and counted per arm.")
    if data.n_duplicates:
        sentences.append(f"{data.n_duplicates} duplicate trial run(s) with the same trial id were ignored.")
    efficiency = study_efficiency(data.parent, data.trials)
    if efficiency is not None:
        sentences.append(efficiency.sentence())
    return table, sentences


def _arm_rows(arms: pd.DataFrame) -> Table:
    probed = has_probe(arms)  # the long-range probe's column, where recorded
    timed = has_equal_time(arms)  # valid BPC at equal training time T*, where runs have an epoch history
    rows = [[str(r["protocol"]), format_budget(r["budget"]), str(r["family"]), str(r["n_seeds"]),
             str(r["n_configs"]), fmt_int(r["num_params"]),
             fmt_ci(r["valid_mean"], r["valid_low"], r["valid_high"], r["n_seeds"]),
             fmt_ci(r["test_mean"], r["test_low"], r["test_high"], r["n_test"]),
             *([fmt_ci(r["closer_mean"], r["closer_low"], r["closer_high"], r["n_closer"])] if probed else []),
             *([_equal_time_cell(r)] if timed else []),
             fmt_int(r["tokens_per_s"]), fmt_seconds(r["train_time_s"]), _time_cell(r), str(r["excluded"])]
            for _, r in arms.iterrows()]
    return Table("Per arm: mean and 95 % t-interval over seeds",
                 ["protocol", "budget", "family", "seeds", "configs", "parameters", "valid BPC [95 % CI]",
                  "test BPC [95 % CI]", *(["closer BPC [95 % CI]"] if probed else []),
                  *(["valid BPC at T* [95 % CI]"] if timed else []), "tokens/s",
                  "train time (s)", "times measured", "excluded runs"], rows,
                 note="seeds: runs that learned in the arm's representative configuration. configs > 1: the arm is "
                      "represented by a configuration in which every finished run learned, if any, then the lowest "
                      "mean valid BPC. Excluded runs: of the arm's finished runs in this protocol, how many were left "
                      "out and why (did not learn: diverged, or BPC not below chance). Times measured: whether the "
                      f"arm's runs had their CPUs to themselves (cpu_share >= {CPU_SHARE_MIN:g}, load per CPU <= "
                      f"{LOAD_PER_CPU_MAX:g}); only then are tokens/s, train time"
                      + (" and valid BPC at T*" if timed else "") + " a measurement of the model."
                      + (" Valid BPC at T*: interpolated at equal training time (the shortest selected run's "
                         "training time at the budget); runs with no evaluation before T* are counted, not "
                         "extrapolated." if timed else ""))


def _time_cell(r: pd.Series) -> str:
    """``yes``, ``no: shared CPUs (cpu_share 0.40-0.60)``, ``not recorded``, or empty for an arm without runs."""
    if not r["time_measurement"]:
        return ""
    return LoadCheck(r["time_measurement"], int(r["n_seeds"]), r["cpu_share_min"], r["cpu_share_max"],
                     r["load_per_cpu_max"]).cell()


def _equal_time_cell(r: pd.Series) -> str:
    cell = fmt_ci(r["equal_time_mean"], r["equal_time_low"], r["equal_time_high"], r["n_equal_time"])
    missing = int(r["n_no_eval_before_equal_time"])
    return cell + (f" ({missing} run{'s' if missing > 1 else ''}: no evaluation before T*)" if missing else "")


def _equal_time_paragraphs(doc: Report, arms: pd.DataFrame, comparisons: list, selected: pd.DataFrame) -> None:
    """Per protocol and budget with a T* and a comparison: what the arms say at equal training time, and whether
    the runs had their CPUs (else the times are no measurement)."""
    if not has_equal_time(arms):
        return
    several = arms["protocol"].nunique() > 1
    for (protocol, budget), at in arms.groupby(["protocol", "budget"], sort=False):
        t_star = float(at["equal_time_s"].iloc[0])
        here = [c for c in comparisons if c.protocol == protocol and c.budget == budget]
        if not np.isfinite(t_star) or not here:
            continue
        where = f" in protocol \"{protocol}\"" if several else ""
        head = (f"At equal training time (T* = {fmt_seconds(t_star)} s, the shortest run's training time at this "
                f"budget, {format_budget(budget)}{where}), valid BPC is interpolated at T*.")
        late = [f"{r['family']} {int(r['n_no_eval_before_equal_time'])}" for _, r in at.iterrows()
                if r["n_no_eval_before_equal_time"]]
        note = (f" Runs with no evaluation before T* (left out, not extrapolated; the equal-time view needs several "
                f"evaluations per run): {', '.join(late)}." if late else "")
        verdicts = [c.verdict for c in here if c.metric == EQUAL_TIME]
        if not verdicts:
            doc.p(f"{head} No comparison has runs evaluated before T* in both arms.{note}")
            continue
        load = check_load(selected[(selected["protocol"] == protocol) & same_value(selected["budget"], budget)])
        doc.p(head + note + " " + load.sentence())
        doc.ul(verdicts)


def _seeds_cell(r: pd.Series) -> str:
    if r["test"] == WELCH or (pd.isna(r["n_pairs"]) and r["n_other"]):
        return f"{r['n_nested']} and {r['n_other']} seeds"
    return f"{int(r['n_pairs'])} pairs" if pd.notna(r["n_pairs"]) else f"{r['n_nested']} and {r['n_other']} seeds"


def _comparison_rows(comparisons: pd.DataFrame) -> Table:
    timed = bool((comparisons["time_measurement"] != "").any()) if len(comparisons) else False
    rows = []
    for _, r in comparisons.iterrows():
        mean, ci = fmt_signed_ci(r["diff_mean"], r["diff_low"], r["diff_high"])
        if ci == "n/a" and np.isfinite(r["diff_mean"]) and min(r["n_nested"], r["n_other"]) < MIN_INTERVAL_N:
            ci = f"none (fewer than {MIN_INTERVAL_N} seeds a side)"
        rows.append([str(r["protocol"]), format_budget(r["budget"]), str(r["comparison"]), str(r["metric"]),
                     str(r["test"]), _seeds_cell(r), mean, ci, f"{r['t']:.2f}" if np.isfinite(r["t"]) else "n/a",
                     fmt_p(r["p"]), str(r["improvement"]), *([str(r["time_measurement"])] if timed else []),
                     str(r["excluded"])])
    return Table("Differences between arms of one protocol (nested - other; negative: the Nested LSTM is better)",
                 ["protocol", "budget", "comparison", "metric", "test", "seeds", "mean diff", "95 % CI", "t", "p",
                  "P(nested better) [95 % bootstrap]", *(["times measured"] if timed else []), "excluded runs"],
                 rows,
                 note=f"Test: the {TEST_NAME} when both arms learned on exactly the same seeds; otherwise the seeds "
                      f"are not truly paired and the test is {WELCH_NAME} over all seeds of both arms; none with "
                      f"fewer than 2 seeds a side or arms without a common protocol; no interval with fewer than "
                      f"{MIN_INTERVAL_N}. No correction for multiple comparisons. P(nested better): the share of "
                      "common seeds in which the Nested LSTM has the lower BPC (ties half), with a "
                      "percentile-bootstrap interval over those pairs (Bouthillier et al. 2021); seeds only one arm "
                      "has are left out."
                      + (" Times measured (valid BPC at T* rows): whether both arms' runs had their CPUs." if timed
                         else ""))


def _config_rows(configs: pd.DataFrame) -> Table | None:
    if configs.empty:
        return None
    factors = [c for c in configs.columns if c.startswith("factor.")]
    headers = ["protocol", "budget", "family", *(f.removeprefix("factor.") for f in factors), "config", "seeds",
               "valid BPC [95 % CI]", "test BPC [95 % CI]", "excluded runs", "represents its arm"]
    rows = [[str(r["protocol"]), format_budget(r["budget"]), str(r["family"]),
             *("" if pd.isna(r[f]) else str(r[f]) for f in factors), str(r["config_hash"])[:12], str(r["n_seeds"]),
             fmt_ci(r["valid_mean"], r["valid_low"], r["valid_high"], r["n_seeds"]),
             fmt_ci(r["test_mean"], r["test_low"], r["test_high"], r["n_seeds"]), str(r["excluded"]),
             "yes" if r["selected"] else ""]
            for _, r in configs.iterrows()]
    return Table("Every configuration of the analysed phases", headers, rows)


def _code_versions_sentence(arms: pd.DataFrame, runs: pd.DataFrame) -> str:
    """Which code trained the runs: one version for all, else each arm that spans several (tag nlstm.code_version)."""
    if "code_version" not in runs or runs["code_version"].isna().all():
        return "Code versions: not recorded (runs recorded before nlstm.code_version)."
    several = arms[arms["code_versions"].str.contains(r"\(\d+\)", regex=True)]
    if several.empty:
        versions = sorted(set(arms["code_versions"]))
        return f"Code version: {', '.join(versions)} (every arm's runs)."
    return "Code versions: " + "; ".join(
        f"{r['family']} at {format_budget(r['budget'])} ({r['protocol']}) spans {r['code_versions']}"
        for _, r in several.iterrows()) + " (runs per version in brackets)."


def excluded_frame(aset: AnalysisSet) -> pd.DataFrame:
    """Runs left out of the statistics: every run that did not learn or failed (any phase), and the pruned runs of
    the analysed phases (pruning is routine in a search)."""
    columns = ["run_name", "phase", "budget", "family", "seed", "outcome", "outcome_reason"]
    trials = aset.trials
    if trials.empty:
        return pd.DataFrame(columns=columns)
    keep = trials["outcome"].isin([NOT_LEARNED, FAILED]) | ((trials["outcome"] == PRUNED)
                                                            & trials["phase"].isin(aset.phases))
    return trials.loc[keep, columns].reset_index(drop=True)


def _excluded_rows(excluded: pd.DataFrame) -> Table | None:
    if excluded.empty:
        return None
    rows = [[str(r["run_name"]), str(r["phase"]), format_budget(r["budget"]), str(r["family"]),
             "" if pd.isna(r["seed"]) else str(r["seed"]), str(r["outcome"]), str(r["outcome_reason"])[:200]]
            for _, r in excluded.iterrows()]
    return Table("Excluded runs", ["run", "phase", "budget", "family", "seed", "outcome", "reason"], rows,
                 note=f"Outcomes: {', '.join(EXCLUDED)}. None of these runs enters a mean, interval or test.")


def build_report(data: StudyData, aset: AnalysisSet | None = None) -> tuple[Report, dict[str, pd.DataFrame]]:
    """The document and the tidy full-precision tables behind it (:mod:`dashboards.tables`), by CSV name."""
    aset = aset or analysis_set(data.trials, (data.parent or {}).get("params"))
    aset = add_machine_load(add_equal_time(aset, data.histories), data.histories)
    arms = arm_table(aset)
    expected = expected_best_table(aset.trials)
    comparisons = paired_comparisons(aset, arms) if len(arms) else []
    comp_frame = comparison_table(comparisons)
    configs = config_table(aset)
    excluded = excluded_frame(aset)
    doc = Report(f"Study report: {data.name}")
    parent = data.parent or {}
    phases = ", ".join(data.phases_done) or "none yet"
    doc.p(f"Generated {data.loaded_at:%Y-%m-%d %H:%M} UTC from `{data.tracking_uri}` (experiment "
          f"{data.experiment_id}, parent run `{parent.get('run_id', 'missing')}`, status "
          f"{parent.get('status', 'unknown')}). Phases finished: {phases}."
          + (f" Corpus: {parent['params']['corpus']}." if parent.get("params", {}).get("corpus") else ""))

    doc.h2("Runs")
    runs_table, sentences = _runs_summary(data, aset)
    doc.blocks.append(runs_table)
    doc.p(" ".join(sentences))
    doc.p(aset.note)

    doc.h2("Results per arm")
    if arms.empty:
        doc.p("No arm has a finished run yet.")
    else:
        doc.blocks.append(_arm_rows(arms))
        doc.p(_code_versions_sentence(arms, aset.runs))

    doc.h2("Nested vs stacked and single, within one protocol")
    primary = "test_bpc" if any(c.metric == "test_bpc" and c.n_nested for c in comparisons) else "best_valid_bpc"
    if not comparisons:
        doc.p("There is no budget at which a Nested LSTM and a stacked or single-layer LSTM have both finished runs, "
              "so nothing can be compared yet.")
    else:
        doc.blocks.append(_comparison_rows(comp_frame))
        closer = ", and closer BPC where recorded" if any(c.metric == "closer_bpc" for c in comparisons) else ""
        doc.p(f"Verdicts ({'test' if primary == 'test_bpc' else 'validation'} BPC{closer}; a winner is named only "
              f"when both arms learned, with at least {MIN_SEEDS} seeds (pairs) per arm, a 95 % interval of the "
              "difference that excludes 0, and no run of the winner's configuration that did not learn):")
        doc.ul([c.verdict for c in comparisons if c.metric in (primary, "closer_bpc")])
        _equal_time_paragraphs(doc, arms, comparisons, aset.selected)

    if (aset.trials["phase"] == "search").any() if len(aset.trials) else False:
        doc.h2("Tuning budget")
        doc.p(budget_sentence((data.parent or {}).get("tags"), aset.trials))
        doc.p(ranking_verdict(expected) + (" Figure 8 draws the curves; tables/expected_best.csv holds them."
                                           if len(expected) else ""))

    doc.h2("Figures")
    for result in all_figures(data, aset, expected):
        doc.blocks.append(FigureBlock(result))

    config_rows = _config_rows(configs)
    if config_rows is not None and len(configs) > len(arms):
        doc.h2("Configurations")
        doc.blocks.append(config_rows)
    excluded_table = _excluded_rows(excluded)
    if excluded_table is not None:
        doc.h2("Excluded runs")
        doc.blocks.append(excluded_table)

    doc.h2("Methods")
    doc.ul([
        "An arm is a family (nlstm-dD: Nested LSTM of depth D; stacked-dD: D stacked layers; single-d1) at a "
        "parameter budget; the width of each was solved from the budget, and the achieved count is shown.",
        "Only runs that learned enter the statistics: a run that diverged or failed, was pruned, or finished with a "
        f"valid or test BPC not {CHANCE_MARGIN_BITS:g} bit below chance (study.record.layout.below_chance; chance "
        "is the corpus's unigram entropy when recorded, else log2 of the vocabulary size) is excluded and counted per "
        "arm; running runs are counted above.",
        "A protocol is one phase's seeds and training budget; an arm (and its representative configuration) lives in "
        "one protocol, and arms are compared only within the same protocol and budget.",
        "Means are over seeds; intervals are two-sided 95 % Student-t intervals (scipy.stats.t.interval), given only "
        f"with at least {MIN_INTERVAL_N} seeds and where both bounds lie in the metric's range (BPC >= 0); "
        "otherwise the mean is shown with its n.",
        f"Differences: the {TEST_NAME} when both arms learned on exactly the same seeds; otherwise the {WELCH_NAME} "
        "over all their seeds, with its interval of the difference of means. Beside it, the probability of "
        "improvement (Bouthillier et al., MLSys 2021): the share of common seeds in which the Nested LSTM has the "
        "lower BPC (ties count half), with a 95 % percentile-bootstrap interval over those pairs "
        "(scipy.stats.bootstrap, 10,000 resamples, seeded).",
        "Wording: a lower BPC is said to mean that a model ends better or worse only when every compared run "
        "stopped at its plateau (tag nlstm.stop_reason) and both families were tuned with the same number of search "
        "trials (evaluate phase); runs at their plateau without that say where the models settle at the "
        "configurations compared; otherwise the verdict says which learns faster within the training budget and "
        "how many runs stopped at max_epochs.",
        f"Times (tokens/s, train time{', valid BPC at T*' if has_equal_time(arms) else ''}) are a measurement only "
        f"where every run had its CPUs: lowest "
        f"cumulative cpu_share >= {CPU_SHARE_MIN:g} and highest 1-minute load average per logical CPU <= "
        f"{LOAD_PER_CPU_MAX:g} (dashboards.machine_load); otherwise the rows say so.",
        *(["Expected best validation BPC of n tuning trials (Dodge et al., EMNLP 2019): the expected minimum of n "
           "draws from a family's completed search trials, exact over the sorted values, with a 95 % "
           "percentile-bootstrap band (the values resampled with replacement, 2,000 times, seeded); pruned and "
           "failed search trials do not enter."] if len(expected) else []),
        *(["Equal training time: per protocol and budget, T* is the smallest final cumulative training time "
           "(evaluation excluded) among the runs in the statistics, so every one of them trained at least T* "
           "seconds; each run's valid BPC at T* is the linear interpolation (numpy.interp) of its per-epoch "
           "(training time, valid BPC) history, and a run whose first evaluation came after T* is counted, not "
           "extrapolated. These values are compared between arms like the others."] if has_equal_time(arms) else []),
        "Memory timescale: the first lag where a unit's autocorrelation drops below 1/e, averaged over units, and "
        "the mean |c_t - c_(t-1)|, both measured on held-out text after training (nlstm.analysis).",
    ])
    frames = {"trials": trials_table(aset.trials, data.param_names), "runs": tidy_runs(data.state_counts()),
              "arms": tidy_arms(arms), "comparisons": tidy_comparisons(comparisons),
              "configs": tidy_configs(configs), "excluded": tidy_excluded(excluded),
              "timescales": tidy_timescales(aset.trials), "expected_best": tidy_expected_best(expected)}
    return doc, frames


# ---------------------------------------------------------------------------- rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(doc: Report) -> str:
    out = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Table):
            out += [f"**{block.caption}**", "", "| " + " | ".join(map(_md_cell, block.headers)) + " |",
                    "|" + "|".join("---" for _ in block.headers) + "|"]
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
            out += ["", f"_{block.note}_", ""] if block.note else [""]
        elif isinstance(block, FigureBlock):
            r = block.result
            out.append(f"### Figure {r.number}. {r.title}")
            out.append("")
            if block.path:
                out += [f"![Figure {r.number}: {r.title}]({block.path})", "", f"_Figure {r.number}. {r.caption}_"]
                for note in r.notes:
                    out += ["", f"Note: {note}"]
            else:
                out.append(f"_Not shown:_ {r.missing}")
            out.append("")
        elif block[0] == "h2":
            out += [f"## {block[1]}", ""]
        elif block[0] == "p":
            out += [block[1], ""]
        elif block[0] == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
    return "\n".join(out).rstrip() + "\n"


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text), quote=False))


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 0.3em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.92em; color: #333; } .note { color: #555; font-size: 0.9em; }
.missing { color: #7a4b00; background: #fff7e6; padding: 0.4em 0.7em; border-left: 3px solid #f0a000; }
code { font-size: 0.92em; background: #f4f4f4; padding: 0 0.2em; }
"""

# Records each image's natural size in the DOM once loaded, so a headless browser can check them.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images), sizes = [];
  imgs.forEach(function (img) {
    img.setAttribute("data-natural-width", img.naturalWidth);
    img.setAttribute("data-natural-height", img.naturalHeight);
    sizes.push([img.id, img.naturalWidth, img.naturalHeight]);
  });
  var out = document.getElementById("image-check");
  if (out) { out.textContent = JSON.stringify(sizes); }
});
"""


def render_html(doc: Report) -> str:
    body = [f"<h1>{_inline_html(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Table):
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in block.headers)
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><caption>{_inline_html(block.caption)}</caption><thead><tr>{head}</tr></thead>"
                        f"<tbody>{rows}</tbody></table>")
            if block.note:
                body.append(f'<p class="note">{_inline_html(block.note)}</p>')
        elif isinstance(block, FigureBlock):
            r = block.result
            body.append(f'<h3 id="figure-{r.number}">Figure {r.number}. {_inline_html(r.title)}</h3>')
            if block.png is not None:
                data = base64.b64encode(block.png).decode("ascii")
                notes = "".join(f'<br><span class="note">{_inline_html(n)}</span>' for n in r.notes)
                body.append(f'<figure><img id="img-figure-{r.number}" alt="Figure {r.number}: {html.escape(r.title)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>Figure {r.number}. '
                            f"{_inline_html(r.caption)}{notes}</figcaption></figure>")
            else:
                body.append(f'<p class="missing">Not shown: {_inline_html(r.missing)}</p>')
        elif block[0] == "h2":
            body.append(f"<h2>{_inline_html(block[1])}</h2>")
        elif block[0] == "p":
            body.append(f"<p>{_inline_html(block[1])}</p>")
        elif block[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_inline_html(doc.title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body)
            + f'\n<pre id="image-check" hidden></pre>\n<script>{CHECK_SCRIPT}</script>\n</body></html>\n')


# ---------------------------------------------------------------------------- writing
def write_report(data: StudyData, out_dir: str | Path, log_to_parent: bool = True) -> ReportFiles:
    """Write ``report.html``, ``report.md``, ``figures/*.png`` and ``tables/*.csv`` to ``out_dir``; log
    them as the ``report/`` artifact folder of the study's parent run."""
    out = Path(out_dir)
    fig_dir, table_dir = out / "figures", out / "tables"
    fig_dir.mkdir(parents=True, exist_ok=True)
    table_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("fig[0-9]-*.png"):  # a figure that is now missing must not linger
        old.unlink()
    doc, frames = build_report(data)
    figure_files = []
    for block in doc.blocks:
        if isinstance(block, FigureBlock) and block.result.figure is not None:
            path = fig_dir / f"fig{block.result.number}-{block.result.slug}.png"
            block.result.figure.savefig(path, dpi=FIGURE_DPI)
            block.png, block.path = path.read_bytes(), f"figures/{path.name}"
            figure_files.append(path)
    table_files = []
    for name, frame in frames.items():
        path = table_dir / f"{name}.csv"
        frame.to_csv(path, index=False)
        table_files.append(path)
    md, page = out / "report.md", out / "report.html"
    md.write_text(render_markdown(doc), encoding="utf-8")
    page.write_text(render_html(doc), encoding="utf-8")
    files = ReportFiles(out, page, md, figure_files, table_files)
    if log_to_parent and data.parent and data.client is not None:
        run_id, client = data.parent["run_id"], data.client
        for path in (md, page):  # only what this function wrote, not whatever else lives in out_dir
            client.log_artifact(run_id, str(path), artifact_path="report")
        for path in figure_files:
            client.log_artifact(run_id, str(path), artifact_path="report/figures")
        for path in table_files:
            client.log_artifact(run_id, str(path), artifact_path="report/tables")
        files.logged_to = data.parent["run_id"]
    return files
