"""The report's figures (seaborn on matplotlib ``Figure`` objects: no pyplot state, any backend).

Each ``figure_*`` function returns a :class:`FigureResult`: a figure and a one-line caption saying
what it shows and how many runs/seeds it rests on, or, when its data is absent (no search phase,
no memory metrics, nested and stacked never at the same budget, ...), no figure and a sentence
saying so. Intervals are the same Student-t intervals as the tables (:func:`dashboards.stats.t_errorbar`): no
bar where the tables show none (fewer than 3 seeds, or a bound below 0), and a note names those groups.
Families that would sit at the same x are drawn side by side (:func:`dodge_log`, :func:`dodge_offsets`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import EngFormatter, MaxNLocator, NullFormatter, ScalarFormatter

from dashboards.equal_time import add_equal_time
from dashboards.expected_best import MIN_TRIALS, expected_best_table
from dashboards.importance import (
    PED_ANOVA,
    family_importances,
    mean_importance,
    spec_search_space,
)
from dashboards.load import DERIVED_PARAMS, StudyData, epoch_frame
from dashboards.machine_load import add_machine_load
from dashboards.outcome import NOT_LEARNED
from dashboards.search_trials import search_trials
from dashboards.stats import (
    EQUAL_TIME_S,
    MIN_INTERVAL_N,
    AnalysisSet,
    analysis_set,
    bpc_interval,
    family_key,
    family_line,
    format_budget,
    protocol_key,
    same_value,
    sorted_families,
    t_errorbar,
    t_errorbar_signed,
)
from dashboards.timescales import levels_of, load_memories, timescale_frame

METRIC_LABEL = {"best_valid_bpc": "valid BPC", "test_bpc": "test BPC", "valid_bpc": "valid BPC"}
MIN_SEARCH_TRIALS = 3


@dataclass
class FigureResult:
    number: int
    slug: str
    title: str
    caption: str = ""  # one line: what it shows, how many runs/seeds
    figure: Figure | None = None
    missing: str | None = None  # why there is no figure, in one sentence
    notes: list[str] = field(default_factory=list)  # caveats that do not prevent the figure


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Known, harmless warnings of seaborn 0.13 on matplotlib 3.11 / pandas 3 (see stack.md §10)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*vert: bool was deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*vert: bool was deprecated")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"seaborn\..*")
        warnings.filterwarnings("ignore", message=r".*future\.infer_string.*")
        warnings.filterwarnings("ignore", message=r".*(All-NaN|Mean of empty|Degrees of freedom).*",
                                category=RuntimeWarning)
        yield


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig


def family_palette(families) -> dict[str, tuple]:
    """Stable colours: NLSTM depths in blues, stacked depths in oranges, single in green."""
    fams = sorted_families(families)
    out: dict[str, tuple] = {}
    for arch, cmap in (("nlstm", "Blues"), ("stacked", "Oranges"), ("single", "Greens")):
        group = [f for f in fams if f.split("-d")[0] == arch]
        colors = sns.color_palette(cmap, len(group) + 2)[2:] if len(group) > 1 else [sns.color_palette(cmap, 4)[2]]
        out.update(zip(group, colors, strict=False))
    others = [f for f in fams if f not in out]
    out.update(zip(others, sns.color_palette("Greys", len(others) + 2)[2:], strict=False))
    return out


def _runs_seeds(frame: pd.DataFrame) -> str:
    seeds = frame.groupby(["family", "budget"], dropna=False)["seed"].nunique()
    return f"{len(frame)} runs, {_span(seeds)} seed{'s' if seeds.max() > 1 else ''} per arm"


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _span(counts: pd.Series) -> str:
    return f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"


def _primary_metric(frame: pd.DataFrame) -> str:
    return "test_bpc" if len(frame) and np.isfinite(frame["test_bpc"].astype(float)).all() else "best_valid_bpc"


def one_protocol(sel: pd.DataFrame, score) -> tuple[pd.DataFrame, str | None]:
    """The runs of the one protocol with the highest ``score(runs)`` (a figure never mixes seeds or epochs of
    different phases), and a note naming the protocols it leaves out (None when there are none)."""
    if sel.empty or "protocol" not in sel or sel["protocol"].nunique() < 2:
        return sel, None
    groups = {p: g for p, g in sel.groupby("protocol", sort=False)}
    best = max(sorted(groups, key=protocol_key), key=lambda p: score(groups[p]))
    others = ", ".join(sorted((p for p in groups if p != best), key=protocol_key))
    return groups[best], (f"Shows the {best} protocol only; the runs of the {others} protocol (other seeds or "
                          "training budget) are in the tables.")


def _breadth(runs: pd.DataFrame) -> tuple[int, int]:
    return (runs["family"].nunique(), len(runs))


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable ints to floats, so seaborn/matplotlib see plain numbers."""
    out = frame.copy()
    for col in ("depth", "seed"):
        if col in out:
            out[col] = out[col].astype(float)
    return out


def dodge_offsets(groups: list[str], step: float) -> dict[str, float]:
    """Offsets centred on 0, ``step`` apart, one per group in order: groups drawn at the same x (families at one
    budget, one dependency length) side by side instead of one marker over the other."""
    k = len(groups)
    return {g: step * (i - (k - 1) / 2) for i, g in enumerate(groups)}


def dodge_log(frame: pd.DataFrame, column: str, families: list[str], fraction: float = 0.03) -> pd.Series:
    """``column`` (on a log axis) moved per family by a few % of the axis span (``fraction`` of it in decades,
    at least 0.01 decade), so families at the same x stand side by side."""
    x = frame[column].astype(float)
    positive = x[x > 0]
    decades = float(np.log10(positive.max() / positive.min())) + 2 * np.log10(1.25) if len(positive) else 1.0
    offsets = dodge_offsets(families, max(0.01, fraction * decades))
    return x * 10.0 ** frame["family"].map(offsets).astype(float).fillna(0.0)


def _unsupported(frame: pd.DataFrame, metrics: list[str], by: list[str]) -> list[str]:
    """The groups (``family at budget``, ...) whose interval the figure does not draw: fewer than
    MIN_INTERVAL_N values or a bound below 0 (:func:`dashboards.stats.supported`)."""
    out = []
    for key, group in frame.groupby(by, dropna=False, sort=False):
        for metric in metrics:
            values = group[metric].dropna()
            if len(values) and not np.isfinite(bpc_interval(values).low):
                key = key if isinstance(key, tuple) else (key,)
                label = " at ".join(format_budget(k) if isinstance(k, float) else str(k) for k in key)
                out.append(f"{label} (n = {len(values)})")
                break
    return out


def _interval_note(unsupported: list[str]) -> str:
    return (f"No interval bar where the data cannot support one (fewer than {MIN_INTERVAL_N} seeds, or a bound "
            f"below 0 BPC): {', '.join(unsupported)}.")


# ---------------------------------------------------------------------------- 1. parameter-matched
def _budget_axis(ax, runs: pd.DataFrame) -> None:
    """Log x axis with a tick at each budget (the achieved counts sit within about 1 % of them)."""
    ax.set_xscale("log")
    budgets = sorted(b for b in runs["budget"].dropna().unique() if b > 0)
    counts = runs["num_params"].dropna()
    if not budgets or len(budgets) > 12:
        return
    ax.set_xticks(budgets, [format_budget(b) for b in budgets])
    ax.xaxis.set_minor_formatter(NullFormatter())
    low, high = min(budgets[0], counts.min()), max(budgets[-1], counts.max())
    ax.set_xlim(low / 1.25, high * 1.25)


def figure_parameter_matched(aset: AnalysisSet) -> FigureResult:
    res = FigureResult(1, "parameter-matched", "Parameter-matched comparison")
    sel, note = one_protocol(_plain(aset.selected), lambda r: (r["budget"].nunique(), *_breadth(r)))
    if sel.empty:
        res.missing = "No run has completed yet, so there is nothing to compare at matched parameter counts."
        return res
    metrics = [m for m in ("best_valid_bpc", "test_bpc") if np.isfinite(sel[m].astype(float)).any()]
    families = sorted_families(sel["family"])
    palette = family_palette(families)
    sel = sel.assign(x_dodged=dodge_log(sel, "num_params", families))
    fig = new_figure(5.2 * len(metrics), 4.0)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=True))
    with quiet():
        for ax, metric in zip(axes, metrics, strict=True):
            data = sel[np.isfinite(sel[metric].astype(float))]
            sns.lineplot(data=data, x="x_dodged", y=metric, hue="family", hue_order=families, palette=palette,
                         marker="o", errorbar=t_errorbar, err_style="bars", err_kws={"capsize": 3}, ax=ax,
                         legend=ax is axes[-1])
            _budget_axis(ax, sel)
            ax.set_xlabel("parameters (achieved; ticks at the budgets, log scale)")
            ax.set_ylabel(METRIC_LABEL[metric])
            ax.set_title(METRIC_LABEL[metric])
            ax.grid(True, which="both", alpha=0.3)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="family")
    n_budgets = sel["budget"].nunique()
    res.figure = fig
    res.caption = _capital(f"{' and '.join(METRIC_LABEL[m] for m in metrics)} against achieved parameter count for "
                   f"{len(families)} families at {n_budgets} budget{'s' if n_budgets > 1 else ''}: mean over seeds "
                   f"with 95 % t-interval bars ({_runs_seeds(sel)}).")
    if len(families) > 1:
        res.notes.append("Families are drawn side by side (moved by a few per cent along the log axis) so that one "
                         "does not hide another; the tables hold the exact parameter counts.")
    unsupported = _unsupported(sel, metrics, ["family", "budget"])
    if unsupported:
        res.notes.append(_interval_note(unsupported))
    if n_budgets < 2:
        res.notes.append("Only one budget has completed runs, so the figure shows no trend over model size.")
    if note:
        res.notes.append(note)
    if "test_bpc" not in metrics:
        res.notes.append("No run has a test BPC yet (search trials skip it), so only validation BPC is shown.")
    return res


# ---------------------------------------------------------------------------- 2. nesting vs stacking
MAX_DEPTH_ROWS = 4  # budgets drawn in figure 2 (the most populated ones); the tables hold the rest


def _depth_budgets(sel: pd.DataFrame) -> list[tuple[float, list[int]]]:
    """Every budget at which nesting and stacking have runs at a common depth, with those depths, in budget
    order."""
    out = []
    for budget, group in sel.groupby("budget", dropna=False):
        nested = set(group.loc[group["arch"] == "nlstm", "depth"].dropna().astype(int))
        stacked = set(group.loc[group["arch"] == "stacked", "depth"].dropna().astype(int))
        if nested & stacked:
            out.append((budget, sorted(nested & stacked)))
    return out


def _depth_pairs(runs: pd.DataFrame, depths: list[int], metric: str) -> pd.DataFrame:
    """nested - stacked per seed at each depth (seeds run in both arms only), per nested line (``nlstm``, and
    ``nlstm-tanh`` where the outer candidate was varied)."""
    pairs = []
    stacked_runs = runs[runs["arch"] == "stacked"]
    for line in sorted({family_line(f) for f in runs.loc[runs["arch"] == "nlstm", "family"]}):
        nested_runs = runs[(runs["arch"] == "nlstm") & (runs["family"].map(family_line) == line)]
        for depth in depths:
            a = nested_runs[nested_runs["depth"] == depth].groupby("seed")[metric].mean()
            b = stacked_runs[stacked_runs["depth"] == depth].groupby("seed")[metric].mean()
            pairs += [{"line": line, "depth": depth, "seed": s, "diff": a[s] - b[s]}
                      for s in a.index.intersection(b.index)]
    return pd.DataFrame(pairs, columns=["line", "depth", "seed", "diff"])


DEPTH_DODGE = 0.08  # depth units between lines drawn at the same depth


def _depth_row(ax_l, ax_r, at: pd.DataFrame, depths: list[int], budget: float, metric: str,
               legend: bool) -> int:
    """One budget's row of figure 2: the metric against depth (left) and the paired differences (right).
    Returns the number of seed pairs."""
    arch_runs = at[at["arch"].isin(["nlstm", "stacked"])].assign(line=lambda f: f["family"].map(family_line))
    lines = sorted(set(arch_runs["line"]), key=lambda line: (family_key(line.partition("-")[0] + "-d0")[0], line))
    offsets = dodge_offsets(lines, DEPTH_DODGE)
    arch_runs = arch_runs.assign(x_dodged=arch_runs["depth"].astype(float) + arch_runs["line"].map(offsets))
    diffs = _depth_pairs(arch_runs, depths, metric)
    palette = family_palette(sorted_families(arch_runs["family"]))
    colors = {line: palette[next(f for f in sorted_families(arch_runs["family"]) if family_line(f) == line)]
              for line in lines}
    sns.lineplot(data=arch_runs, x="x_dodged", y=metric, hue="line", hue_order=lines, palette=colors,
                 marker="o", errorbar=t_errorbar, err_style="bars", err_kws={"capsize": 3}, ax=ax_l, legend=legend)
    single = at[at["arch"] == "single"][metric].dropna()
    if len(single):
        lo, hi = t_errorbar(single)
        ax_l.errorbar([1], [single.mean()], yerr=[[single.mean() - lo], [hi - single.mean()]], fmt="s",
                      color=family_palette(["single-d1"])["single-d1"], capsize=3, label="single (depth 1)")
    if legend:
        ax_l.legend(frameon=False)
    ax_l.set_xticks(sorted(set(arch_runs["depth"].dropna().astype(int)) | ({1} if len(single) else set())))
    ax_l.set_xlabel("depth (nesting levels / stacked layers)")
    ax_l.set_ylabel(METRIC_LABEL[metric])
    ax_l.set_title(f"{METRIC_LABEL[metric]} at budget {format_budget(budget)}")
    ax_r.axhline(0.0, color="0.4", lw=1, ls="--")
    if not diffs.empty:
        nested_lines = sorted(set(diffs["line"]))
        shift = dodge_offsets(nested_lines, 2 * DEPTH_DODGE)
        for line, part in diffs.groupby("line"):
            color = colors.get(line, "0.45")
            ax_r.scatter(part["depth"] + shift[line] + np.random.default_rng(0).uniform(-0.04, 0.04, len(part)),
                         part["diff"], s=18, color=color, alpha=0.7, label=line if len(nested_lines) > 1 else None)
            for depth, group in part.groupby("depth"):
                lo, hi = t_errorbar_signed(group["diff"])
                mean = group["diff"].mean()
                ax_r.errorbar([depth + shift[line] + 0.12], [mean], yerr=[[mean - lo], [hi - mean]], fmt="D",
                              color="k", capsize=4)
        if len(nested_lines) > 1:
            ax_r.legend(frameon=False, fontsize=8)
        ax_r.set_xticks(sorted(diffs["depth"].unique()))
        ax_r.set_xlim(diffs["depth"].min() - 0.5, diffs["depth"].max() + 0.5)
    ax_r.set_xlabel("depth")
    ax_r.set_ylabel(f"nested - stacked ({METRIC_LABEL[metric]})")
    ax_r.set_title(f"paired by seed at {format_budget(budget)} (< 0: nesting better)")
    return len(diffs)


def figure_depth(aset: AnalysisSet) -> FigureResult:
    res = FigureResult(2, "nesting-vs-stacking", "Depth by nesting vs depth by stacking")
    sel, note = one_protocol(_plain(aset.selected), lambda r: (
        sum(len(depths) for _, depths in _depth_budgets(r)), *_breadth(r)))
    rows = _depth_budgets(sel) if not sel.empty else []
    if not rows:
        res.missing = ("No budget has completed nested and stacked runs at the same depth, so depth by nesting "
                       "cannot be compared with depth by stacking yet.")
        return res
    left_out = []
    if len(rows) > MAX_DEPTH_ROWS:  # keep the budgets with the most depths, then the most runs
        size = {b: (len(d), int(same_value(sel["budget"], b).sum())) for b, d in rows}
        kept = sorted(sorted(rows, key=lambda r: size[r[0]], reverse=True)[:MAX_DEPTH_ROWS], key=lambda r: r[0])
        left_out = [format_budget(b) for b, _ in rows if all(b != k for k, _ in kept)]
        rows = kept
    at_all = sel[sel["budget"].isin([b for b, _ in rows])]
    metric = _primary_metric(at_all)
    fig = new_figure(10.5, 3.7 * len(rows))
    axes = np.atleast_2d(fig.subplots(len(rows), 2, squeeze=False))
    n_pairs = 0
    with quiet():
        for i, (budget, depths) in enumerate(rows):
            at = sel[same_value(sel["budget"], budget)]
            n_pairs += _depth_row(axes[i, 0], axes[i, 1], at, depths, budget, metric, legend=i == 0)
    budgets = " and ".join(format_budget(b) for b, _ in rows)
    all_depths = sorted({d for _, depths in rows for d in depths})
    res.figure = fig
    res.caption = _capital(f"{METRIC_LABEL[metric]} against depth at budget{'s' if len(rows) > 1 else ''} {budgets} "
                           f"for nesting vs stacking (left, mean and 95 % t-interval; {len(at_all)} runs) and the "
                           f"per-seed paired difference nested - stacked (right: dots, with mean and 95 % t-interval; "
                           f"{n_pairs} seed pairs over depth{'s' if len(all_depths) > 1 else ''} "
                           f"{', '.join(map(str, all_depths))}).")
    for budget, depths in rows:
        if len(depths) < 2:
            res.notes.append(f"At budget {format_budget(budget)} nesting and stacking share only depth {depths[0]}, "
                             "so there is no trend over depth there.")
    if left_out:
        res.notes.append(f"Budgets {', '.join(left_out)} are not drawn (at most {MAX_DEPTH_ROWS} rows); the tables "
                         "hold their numbers.")
    if n_pairs == 0:
        res.notes.append("No seed completed in both arms, so the right panels have no pairs.")
    if note:
        res.notes.append(note)
    return res


# ---------------------------------------------------------------------------- 3. time-matched
def figure_time_matched(data: StudyData, aset: AnalysisSet) -> FigureResult:
    res = FigureResult(3, "time-matched", "Time-matched view")
    sel, note = one_protocol(aset.selected, _breadth)
    epochs = epoch_frame(data, sel["run_id"]) if not sel.empty else pd.DataFrame()
    need = {"valid_bpc", "train_time_s", "tokens_seen"}
    if epochs.empty or not need <= set(epochs.columns):
        res.missing = "No per-epoch metrics (valid BPC, training time, tokens seen) have been recorded yet."
        return res
    epochs = _plain(epochs.dropna(subset=list(need)))
    epochs["budget "] = epochs["budget"].map(format_budget)
    families = sorted_families(epochs["family"])
    palette = family_palette(families)
    multi_budget = epochs["budget"].nunique() > 1
    fig = new_figure(10.5, 4.0)
    axes = fig.subplots(1, 2, sharey=True)
    with quiet():
        for ax, x, label in ((axes[0], "train_time_s", "training time (s, evaluation excluded)"),
                             (axes[1], "tokens_seen", "training tokens seen")):
            sns.lineplot(data=epochs, x=x, y="valid_bpc", hue="family", hue_order=families, palette=palette,
                         style="budget " if multi_budget else None, units="run_id", estimator=None, marker="o",
                         markersize=3, lw=1, alpha=0.7, ax=ax, legend=ax is axes[-1])
            ax.set_xlabel(label)
            ax.set_ylabel("valid BPC")
            ax.grid(True, alpha=0.3)
    # Token counts in the hundreds of thousands ran into each other as plain integers: 100k, 1.5M.
    axes[1].xaxis.set_major_locator(MaxNLocator(5))
    axes[1].xaxis.set_major_formatter(EngFormatter(sep=""))
    t_stars = _mark_equal_times(axes[0], sel)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    n_runs = epochs["run_id"].nunique()
    res.figure = fig
    res.caption = (f"Validation BPC after each epoch against cumulative training time (left) and tokens seen (right), "
                   f"one line per run ({n_runs} runs, {len(families)} families): at equal time the faster core "
                   "gets more updates.")
    if t_stars:
        at = "; ".join(f"{format_budget(b)}: {t:,.1f} s" if multi_budget else f"{t:,.1f} s" for b, t in t_stars)
        res.caption += (f" Dashed vertical line{'s' if len(t_stars) > 1 else ''}: T* ({at}), the shortest run's "
                        "training time per budget, where the report compares valid BPC at equal training time.")
    if note:
        res.notes.append(note)
    return res


def _mark_equal_times(ax, sel: pd.DataFrame) -> list[tuple[float, float]]:
    """A dashed vertical line at each budget's T* (``dashboards.equal_time``), labelled with the budget when there
    are several; returns the (budget, T*) pairs drawn."""
    if EQUAL_TIME_S not in sel:
        return []
    t_stars = sel.dropna(subset=[EQUAL_TIME_S]).groupby("budget")[EQUAL_TIME_S].first().sort_index()
    for budget, t_star in t_stars.items():
        ax.axvline(t_star, color="0.35", lw=1, ls="--", zorder=0)
        if len(t_stars) > 1:
            ax.annotate(f"T* {format_budget(budget)}", (t_star, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", ha="left", va="top", fontsize=7, color="0.35",
                        rotation=90)
    return [(float(b), float(t)) for b, t in t_stars.items()]


# ---------------------------------------------------------------------------- 4. learning curves
def figure_learning_curves(data: StudyData, aset: AnalysisSet) -> FigureResult:
    res = FigureResult(4, "learning-curves", "Learning curves per family")
    sel, note = one_protocol(aset.selected, _breadth)
    epochs = epoch_frame(data, sel["run_id"]) if not sel.empty else pd.DataFrame()
    if epochs.empty or "valid_bpc" not in epochs:
        res.missing = "No per-epoch validation BPC has been recorded yet, so there are no learning curves."
        return res
    epochs = _plain(epochs)
    budgets = sorted(epochs["budget"].dropna().unique()) or [math.nan]
    families = sorted_families(epochs["family"])
    palette = family_palette(families)
    fig = new_figure(min(4.6 * len(budgets), 14) + 1.5, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(budgets), sharey=True, squeeze=False)[0])
    with quiet():
        for ax, budget in zip(axes, budgets, strict=True):
            part = epochs[epochs["budget"] == budget] if pd.notna(budget) else epochs
            sns.lineplot(data=part, x="epoch", y="valid_bpc", hue="family", hue_order=families, palette=palette,
                         estimator="median", errorbar=("pi", 50), marker="o", ax=ax, legend=ax is axes[-1])
            if "train_bpc" in part and part["train_bpc"].notna().any():
                sns.lineplot(data=part, x="epoch", y="train_bpc", hue="family", hue_order=families, palette=palette,
                             estimator="median", errorbar=None, ls="--", lw=1, ax=ax, legend=False)
            ax.set_title(f"budget {format_budget(budget)}")
            ax.set_ylabel("BPC (solid: valid, dashed: train)")
            ax.grid(True, alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    if axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="family")
    n_runs = epochs["run_id"].nunique()
    res.figure = fig
    res.caption = (f"Median validation BPC per epoch (band: interquartile range over seeds) and median training BPC "
                   f"(dashed) per family, one panel per budget ({n_runs} runs).")
    if epochs["epoch"].nunique() < 2:
        res.notes.append("Every run has a single epoch so far, so the curves are single points.")
    if note:
        res.notes.append(note)
    return res


# ---------------------------------------------------------------------------- 5. search diagnostics
def _importance_panel(ax, table: pd.DataFrame, families: list[str], palette: dict) -> None:
    """Grouped bars: one bar per (hyper-parameter, family)."""
    order = list(mean_importance(table).index)
    sns.barplot(data=table, x="importance", y="parameter", hue="family", order=order,
                hue_order=[f for f in families if f in set(table["family"])], palette=palette, ax=ax,
                legend=False)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel(f"importance per family: {table['method'].iloc[0]}")
    ax.set_ylabel("")
    ax.set_title("hyper-parameter importance per family")


def figure_search(data: StudyData, aset: AnalysisSet) -> FigureResult:
    res = FigureResult(5, "search", "Search diagnostics")
    search = _plain(aset.trials[aset.trials["phase"] == "search"])
    if search.empty:
        res.missing = "No search-phase trial has been recorded, so there are no search diagnostics."
        return res
    done = search[(search["state"] == "completed") & np.isfinite(search["best_valid_bpc"].astype(float))]
    n_not_learned = int((done["outcome"] == NOT_LEARNED).sum()) if "outcome" in done else 0
    if n_not_learned:  # 15-700 BPC next to 1.5 would flatten every panel; they are listed under "Excluded runs"
        done = done[done["outcome"] != NOT_LEARNED]
    if len(done) < MIN_SEARCH_TRIALS:
        res.missing = (f"Only {len(done)} search trial{'s have' if len(done) != 1 else ' has'} completed"
                       f"{' and learned' if n_not_learned else ''} (of "
                       f"{len(search)} recorded); the search diagnostics need at least {MIN_SEARCH_TRIALS}.")
        return res
    done = done.sort_values("start_time", kind="stable").reset_index(drop=True)
    done["trial"] = np.arange(1, len(done) + 1)
    candidates = [p for p in data.param_names if p not in DERIVED_PARAMS and p not in ("arch", "depth", "family")
                  and p in done and done[p].dropna().astype(str).nunique() > 1]
    space = spec_search_space(data.client, (data.parent or {}).get("run_id")) if candidates else None
    importance = family_importances(done, candidates, space) if candidates else pd.DataFrame()
    families = sorted_families(search["family"])
    palette = family_palette(families)
    fig = new_figure(11.0, 7.2)
    grid = fig.subplots(2, 2)
    ax_hist, ax_imp, ax_p1, ax_p2 = grid.ravel()
    with quiet():
        sns.scatterplot(data=done, x="trial", y="best_valid_bpc", hue="family", hue_order=families, palette=palette,
                        ax=ax_hist)
        ax_hist.step(done["trial"], done["best_valid_bpc"].cummin(), where="post", color="k", lw=1.2,
                     label="best so far")
        ax_hist.legend(frameon=False, fontsize=8)
        ax_hist.set_xlabel("completed search trial (in start order)")
        ax_hist.xaxis.get_major_locator().set_params(integer=True)
        ax_hist.set_ylabel("best valid BPC")
        ax_hist.set_title("optimisation history")
        if importance.empty:
            ax_imp.text(0.5, 0.5, "no hyper-parameter varies within a family\nwith 2 or more completed trials",
                        ha="center", va="center", transform=ax_imp.transAxes)
            ax_imp.set_axis_off()
        else:
            _importance_panel(ax_imp, importance, families, palette)
        top = list(mean_importance(importance).index[:2]) if not importance.empty else candidates[:2]
        for ax, name in zip((ax_p1, ax_p2), (top + [None, None])[:2], strict=True):
            if name is None:
                ax.set_axis_off()
                continue
            present = done[done[name].notna()]  # a conditional parameter is absent from some trials
            x = pd.to_numeric(present[name], errors="coerce")
            numeric = x.notna().all() and not present[name].map(lambda v: isinstance(v, bool)).any()
            plot = present.assign(**{name: x if numeric else present[name].astype(str)})
            sns.scatterplot(data=plot, x=name, y="best_valid_bpc", hue="family", hue_order=families,
                            palette=palette, ax=ax, legend=False)
            if numeric and x.min() > 0 and x.max() / x.min() >= 20:
                ax.set_xscale("log")
            ax.set_ylabel("best valid BPC")
            ax.set_title(f"{name} vs BPC")
    n_pruned, n_failed = int((search["state"] == "pruned").sum()), int((search["state"] == "failed").sum())
    method = importance["method"].iloc[0] if not importance.empty else "n/a"
    per_family = (", ".join(f"{f} {n}" for f, n in importance.groupby("family")["n_trials"].first().items())
                  if not importance.empty else "none")
    res.figure = fig
    res.caption = (f"Search phase: best validation BPC per completed trial with the running best, hyper-parameter "
                   f"importance per family ({method}; completed trials per family: {per_family}) and the top "
                   f"hyper-parameters against BPC ({len(done)} completed trials; {n_pruned} pruned, {n_failed} failed"
                   + (f" and {n_not_learned} that completed without learning" if n_not_learned else "")
                   + " not shown).")
    if not importance.empty:
        res.notes.append(_importance_note(importance, method))
    if len(done) < 10:
        res.notes.append(f"With {len(done)} completed trials the importances are indicative only.")
    if search["budget"].nunique() > 1:
        res.notes.append("The search spans several budgets, so part of the spread in BPC is model size.")
    return res


def _importance_note(importance: pd.DataFrame, method: str) -> str:
    """How these importances relate to optuna-dashboard's (docs/report.md, figure 5)."""
    if method != PED_ANOVA:
        return (f"PED-ANOVA could not run here, so the importances are {method}: they are not comparable with "
                "optuna-dashboard's.")
    observed = sorted(set(importance.loc[importance["domain"] == "observed range", "parameter"]))
    domain = ("the search space's bounds from spec.json" if not observed else
              f"the observed range for {', '.join(observed)} (spec.json gave no bounds for them; optuna-dashboard "
              "uses the search space's, so these can differ)")
    return ("Importance as optuna-dashboard computes it (optuna.importance.get_param_importances with "
            "PedAnovaImportanceEvaluator: how the top 10 % of trials differ from all, normalised to sum 1), but per "
            f"family, on that family's completed search trials, with {domain}. The architecture is not a parameter "
            "here; it equals the dashboard's for an Optuna study that holds one family's trials, while an Optuna "
            "study that holds every family mixes them (the family then competes with each hyper-parameter).")


# ---------------------------------------------------------------------------- 6. memory timescales
def _timescale_budget(ts: pd.DataFrame) -> float:
    counts = ts.groupby("budget", dropna=False).agg(families=("family", "nunique"), runs=("run_id", "nunique"))
    counts = counts.reset_index().sort_values(["families", "runs", "budget"], ascending=False, kind="stable")
    return counts["budget"].iloc[0]


def _example_runs(at: pd.DataFrame) -> list[pd.Series]:
    """One NLSTM and one stacked run at the same depth and seed when possible (deepest shared depth)."""
    nested, stacked = at[at["arch"] == "nlstm"], at[at["arch"] == "stacked"]
    for depth in sorted(set(nested["depth"].dropna()) & set(stacked["depth"].dropna()), reverse=True):
        n, s = nested[nested["depth"] == depth], stacked[stacked["depth"] == depth]
        seeds = sorted(set(n["seed"].dropna()) & set(s["seed"].dropna()))
        if seeds:
            return [n[n["seed"] == seeds[0]].iloc[0], s[s["seed"] == seeds[0]].iloc[0]]
    return [frame.iloc[0] for frame in (nested, stacked) if not frame.empty]


def _plot_traces(ax, memories: dict, run: pd.Series, steps: int = 160, units: int = 3) -> None:
    levels = levels_of(memories)
    what = "level" if run["arch"] == "nlstm" else "layer"
    colors = sns.color_palette("viridis", len(levels))
    offsets = [-2.4 * k for k in range(len(levels))]  # one band per level, top to bottom
    for k, trace in enumerate(levels):
        trace = trace[:steps, :units]
        span = float(np.nanmax(np.abs(trace))) or 1.0
        for u in range(trace.shape[1]):
            ax.plot(trace[:, u] / span + offsets[k], color=colors[k], lw=0.9, alpha=0.9)
    # Each band is named on the y axis: a legend inside the axes covered the traces.
    ax.set_yticks(offsets, [f"{what} {k}" for k in range(len(levels))], fontsize=8)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("character position in held-out text")
    ax.set_title(f"{run['family']} seed {int(run['seed'])}: {units} units per {what} (each scaled)", fontsize=9)
    text = memories.get("text")
    text = "" if text is None else ("".join(map(str, np.ravel(text))) if np.ndim(text) else str(text))
    if text:
        shown = text[:70].replace("\n", " ")
        ax.text(0.0, -0.32, f"text: {shown!r}", transform=ax.transAxes, fontsize=7, family="monospace")


def figure_timescales(data: StudyData, aset: AnalysisSet) -> FigureResult:
    res = FigureResult(6, "memory-timescales", "Memory timescales")
    sel, note = one_protocol(_plain(aset.selected), lambda r: (timescale_frame(r)["run_id"].nunique(), *_breadth(r)))
    ts = timescale_frame(sel)
    if ts.empty:
        res.missing = ("No run has memory-timescale metrics yet (timescale_l{k}/step_change_l{k} are recorded for "
                       "evaluate and ablation trials after training).")
        return res
    budget = _timescale_budget(ts)
    ts_at = ts[same_value(ts["budget"], budget)]
    families = sorted_families(ts_at["family"])
    palette = family_palette(families)
    at_runs = sel[sel["run_id"].isin(ts_at["run_id"])]
    examples = _example_runs(at_runs) if data.client is not None else []
    traces = [(run, load_memories(data.client, run["run_id"])) for run in examples]
    traces = [(run, mem) for run, mem in traces if mem is not None and levels_of(mem)]
    fig = new_figure(11.0, 7.4 if traces else 3.9)
    if traces:
        top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
        ax_ts, ax_sc = top.subplots(1, 2)
        trace_axes = np.atleast_1d(bottom.subplots(1, len(traces)))
    else:
        ax_ts, ax_sc = fig.subplots(1, 2)
        trace_axes = []
    with quiet():
        for ax, col, label in ((ax_ts, "timescale", "autocorrelation timescale (steps)"),
                               (ax_sc, "step_change", "mean |c_t - c_(t-1)| per unit")):
            # seaborn divides the dodge by the hue levels less one: with one family it must be off
            sns.pointplot(data=ts_at, x="level", y=col, hue="family", hue_order=families, palette=palette,
                          errorbar=t_errorbar, dodge=0.3 if len(families) > 1 else False, capsize=0.08,
                          markersize=5, linewidth=1.2, ax=ax, legend=ax is ax_sc)
            ax.set_xlabel("level k (NLSTM: 0 = outer memory) / layer k (stacked: 0 = bottom)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        if ax_sc.get_legend() is not None:
            sns.move_legend(ax_sc, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="family")
        for ax, (run, memories) in zip(trace_axes, traces, strict=True):
            _plot_traces(ax, memories, run)
    n_runs = ts_at["run_id"].nunique()
    seeds = ts_at.groupby("family")["seed"].nunique()
    res.figure = fig
    res.caption = (f"Memory timescales at budget {format_budget(budget)}: autocorrelation timescale and mean step "
                   f"change per level (NLSTM) / layer (stacked), mean and 95 % t-interval over seeds ({n_runs} runs, "
                   f"{_span(seeds)} seeds per family)"
                   + ("; below, example memory traces on held-out text." if traces else "."))
    unsupported = _unsupported(ts_at.rename(columns={"level": "level "}), ["timescale", "step_change"],
                               ["family", "level "])
    if unsupported:
        res.notes.append(_interval_note(unsupported).replace(" BPC", ""))
    if not traces:
        res.notes.append("No memories.npz artifact could be read, so no example traces are shown.")
    if ts["budget"].nunique() > 1:
        res.notes.append(f"Timescales are shown for one budget ({format_budget(budget)}) of "
                         f"{ts['budget'].nunique()}; tables/timescales.csv holds every run's.")
    if note:
        res.notes.append(note)
    return res


# ---------------------------------------------------------------------------- 7. long-range probe
def figure_long_range(data: StudyData, aset: AnalysisSet) -> FigureResult:
    """The paper's second claim measured directly: bits per dependent closer against how far back its opener
    lies, per family, with the no-memory bound; the memory timescales of the same runs beside it."""
    res = FigureResult(7, "long-range", "Long-range probe: closing brackets")
    learned = aset.selected
    need = {"closer_bpc", "dependency_length"}
    if learned.empty or not need <= set(learned.columns) or learned["closer_bpc"].isna().all():
        res.missing = ("No run has the long-range probe (closer_bpc is recorded on the synthetic corpus, against "
                       "its dependency_length).")
        return res
    runs = _plain(learned.dropna(subset=["closer_bpc", "dependency_length"])).assign(
        dependency_length=lambda f: f["dependency_length"].astype(float))
    families = sorted_families(runs["family"])
    palette = family_palette(families)
    lengths = sorted(runs["dependency_length"].unique())
    bound = float(runs["closer_bound_bits"].median()) if "closer_bound_bits" in runs else math.nan
    ts = timescale_frame(runs).merge(runs[["run_id", "dependency_length"]], on="run_id", how="left")
    runs = runs.assign(x_dodged=dodge_log(runs, "dependency_length", families))
    fig = new_figure(11.0, 4.2)
    ax_c, ax_t = fig.subplots(1, 2)
    with quiet():
        sns.lineplot(data=runs, x="x_dodged", y="closer_bpc", hue="family", hue_order=families,
                     palette=palette, marker="o", errorbar=t_errorbar, err_style="bars", err_kws={"capsize": 3},
                     ax=ax_c, legend=False)
        # every run as a dot: a length where some seeds learned the dependency and others did not is
        # bimodal, which a mean and t-interval alone hide
        sns.scatterplot(data=runs, x="x_dodged", y="closer_bpc", hue="family", hue_order=families,
                        palette=palette, s=14, alpha=0.55, linewidth=0, legend=False, ax=ax_c)
        if np.isfinite(bound):
            ax_c.axhline(bound, color="0.3", lw=1.2, ls="--")
            ax_c.text(lengths[0], bound, " no memory of the opener", va="bottom", fontsize=8, color="0.3")
        ax_c.axhline(0.0, color="0.6", lw=0.8)
        ax_c.set_xscale("log")
        ax_c.set_xticks(lengths, [f"{x:g}" for x in lengths])
        ax_c.xaxis.set_minor_formatter(NullFormatter())
        ax_c.set_xlabel("dependency length (characters from opener to closer, mean)")
        ax_c.set_ylabel("closer BPC (bits per dependent closer)")
        ax_c.set_title("which closer: lower is better")
        ax_c.grid(True, which="both", alpha=0.3)
        if not ts.empty:
            ts = ts.assign(memory=ts["family"] + " " + np.where(ts["arch"] == "nlstm", "level ", "layer ")
                           + ts["level"].astype(str))
            memories = sorted(ts["memory"].unique(), key=lambda m: (family_key(m.split(" ")[0]), m))
            colors = {m: palette.get(m.split(" ")[0], "0.5") for m in memories}
            styles = {m: (1, 0) if m.endswith(" 0") else (3, 1.5) for m in memories}
            sns.lineplot(data=ts, x="dependency_length", y="timescale", hue="memory", hue_order=memories,
                         palette=colors, style="memory", dashes=styles, markers=True, errorbar=t_errorbar,
                         err_style="bars", err_kws={"capsize": 3}, ax=ax_t)
            ax_t.set_xscale("log")
            ax_t.set_yscale("log")
            ax_t.yaxis.set_major_formatter(ScalarFormatter())
            ax_t.yaxis.set_minor_formatter(NullFormatter())
            ax_t.set_xticks(lengths, [f"{x:g}" for x in lengths])
            ax_t.xaxis.set_minor_formatter(NullFormatter())
            sns.move_legend(ax_t, "upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="memory")
        ax_t.set_xlabel("dependency length")
        ax_t.set_ylabel("autocorrelation timescale (steps, log)")
        ax_t.set_title("memory timescales of the same runs")
        ax_t.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color=palette[f], marker="o") for f in families]
    ax_c.legend(handles, families, frameon=False, fontsize=8, title="family")
    res.figure = fig
    types = round(2 ** bound) if np.isfinite(bound) else None
    res.caption = _capital(
        f"closer BPC (bits for the type of a closing bracket whose opener lies about the dependency length back) "
        f"against dependency length per family, mean and 95 % t-interval over seeds, each run a dot "
        f"({_runs_seeds(runs)}); dashed: "
        + (f"the no-memory bound log2({types} bracket types) = {bound:g} bits" if types else "no bound recorded")
        + "; right: autocorrelation timescale of each level (NLSTM, 0 = outer) or layer (stacked, 0 = bottom).")
    if len(families) > 1:
        res.notes.append("Families are drawn side by side at each dependency length (moved by a few per cent along "
                         "the log axis) so that one does not hide another.")
    unsupported = _unsupported(runs, ["closer_bpc"], ["family", "dependency_length"])
    if unsupported:
        res.notes.append(_interval_note(unsupported))
    if ts.empty:
        res.notes.append("No memory-timescale metrics were recorded for these runs, so the right panel is empty.")
    return res


# ---------------------------------------------------------------------------- 8. expected best vs tuning trials
def figure_expected_best(aset: AnalysisSet, table: pd.DataFrame | None = None) -> FigureResult:
    """Dodge et al. (2019): the expected best validation BPC of n tuning trials, per family, with its bootstrap
    band (``dashboards.expected_best``; the numbers are ``tables/expected_best.csv``)."""
    res = FigureResult(8, "expected-best", "Expected best validation BPC against tuning trials")
    table = expected_best_table(aset.trials) if table is None else table
    if table.empty:
        res.missing = ("No search trial has completed at the search fidelity, so there is no expected best "
                       "validation BPC per tuning budget.")
        return res
    families = sorted_families(table["family"])
    palette = family_palette(families)
    fig = new_figure(7.0, 4.2)
    ax = fig.subplots()
    for family in families:
        part = table[table["family"] == family]
        n, y = part["n_trials"].to_numpy(float), part["expected_best_valid_bpc"].to_numpy(float)
        ax.plot(n, y, marker="o", markersize=3, lw=1.5, color=palette[family], label=f"{family} (N = {len(part)})")
        banded = np.isfinite(part["band_low"].to_numpy(float))
        if banded.any():
            ax.fill_between(n[banded], part["band_low"].to_numpy(float)[banded],
                            part["band_high"].to_numpy(float)[banded], color=palette[family], alpha=0.18, lw=0)
    ax.set_xlabel("tuning trials n (search trials at the search fidelity)")
    ax.set_ylabel("expected best valid BPC")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1), title="family")
    sizes = table.groupby("family")["n_trials"].max()
    res.figure = fig
    res.caption = (f"Expected best validation BPC of a search of n trials (Dodge et al. 2019: the expected minimum of "
                   f"n draws from the family's completed search trials) with a 95 % bootstrap band, per family "
                   f"({int(sizes.sum())} completed search trials; {_span(sizes)} per family).")
    thin = [f for f, size in sizes.items() if size < MIN_TRIALS]
    if thin:
        res.notes.append(f"No band for {', '.join(thin)}: fewer than {MIN_TRIALS} completed search trials.")
    pruned = int(search_trials(aset.trials).pruned.sum())
    if pruned:
        res.notes.append(f"{pruned} search trial{'s' if pruned > 1 else ''} stopped early by the scheduler "
                         "(pruned) did not train to the search fidelity and are not drawn.")
    return res


def all_figures(data: StudyData, aset: AnalysisSet | None = None,
                expected: pd.DataFrame | None = None) -> list[FigureResult]:
    """Figures 1-8 (``expected``: ``tables/expected_best.csv`` when the caller has it, else computed)."""
    if aset is None:
        aset = analysis_set(data.trials, (data.parent or {}).get("params"))
        aset = add_machine_load(add_equal_time(aset, data.histories), data.histories)
    builders = (lambda: figure_parameter_matched(aset), lambda: figure_depth(aset),
                lambda: figure_time_matched(data, aset), lambda: figure_learning_curves(data, aset),
                lambda: figure_search(data, aset), lambda: figure_timescales(data, aset),
                lambda: figure_long_range(data, aset), lambda: figure_expected_best(aset, expected))
    out = []
    for number, build in enumerate(builders, start=1):
        try:
            out.append(build())
        except Exception as exc:  # one broken figure must not cost the whole report
            out.append(FigureResult(number, f"figure-{number}", f"Figure {number}",
                                    missing=f"This figure could not be drawn: {type(exc).__name__}: {exc}"))
    return out


__all__ = ["FigureResult", "all_figures", "dodge_log", "dodge_offsets", "family_key", "family_palette", "figure_depth",
           "figure_expected_best", "figure_learning_curves", "figure_long_range", "figure_parameter_matched",
           "figure_search", "figure_time_matched", "figure_timescales", "one_protocol",
           "quiet"]
