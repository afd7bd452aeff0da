"""Hyper-parameter importance per family, with the estimator optuna-dashboard shows.

optuna-dashboard 0.21 (``optuna_dashboard/_importance.py``) calls
``optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())`` on the
COMPLETE trials of the one Optuna study it opens, with the distributions the sampler used; PED-ANOVA is
also Optuna 5's default evaluator. It measures how much each parameter's distribution among the top 10 %
of trials differs from its distribution among all (Watanabe et al., IJCAI 2023), normalised to sum 1.

The report computes the same, per family: an in-memory Optuna study per family holding that family's
completed search trials (value: the best validation BPC, as the searcher told Optuna), over the
hyper-parameters that vary within the family, with the search space's distributions from the parent run's
``spec.json`` where it can be read (else the observed range, and the report says so). The architecture is
not a parameter here: comparing families is the expected-best figure's job. The numbers equal the
dashboard's for an Optuna study that holds one family's completed trials; an Optuna study that holds every
family (one study for the whole search) mixes them, and there the dashboard's numbers differ.
If PED-ANOVA cannot run, |Spearman rho| with BPC is shown instead, and named.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards.stats import sorted_families

PED_ANOVA = "PED-ANOVA (optuna-dashboard's estimator)"
SPEARMAN = "|Spearman rho| with BPC"
SPACE_TYPES = ("float", "int", "categorical")


def spec_search_space(client, parent_run_id: str | None) -> dict[str, dict[str, Any]] | None:
    """The search space entries (``{"lr": {"type": "float", "low": ..., ...}}``) from the parent run's
    ``spec.json``, the sampled budget included; None where the artifact cannot be read."""
    if client is None or not parent_run_id:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if "spec.json" not in {f.path for f in client.list_artifacts(parent_run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            spec = json.loads(Path(client.download_artifacts(parent_run_id, "spec.json", tmp)).read_text())
    except Exception:  # an unreachable artifact store must not break the report
        return None
    space = dict((spec.get("search") or {}).get("space") or {})
    if isinstance(spec.get("budget"), dict) and spec["budget"].get("type") in SPACE_TYPES:
        space["budget"] = spec["budget"]
    return {k: v for k, v in space.items() if isinstance(v, dict) and v.get("type") in SPACE_TYPES}


def _distribution(entry: dict[str, Any] | None, values: pd.Series):
    """The Optuna distribution of one parameter: the search space's entry where it covers ``values``, else one
    built from the observed values. Returns (distribution, from_space)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    numeric = pd.to_numeric(values, errors="coerce")
    is_numeric = numeric.notna().all() and not values.map(lambda v: isinstance(v, bool)).any()
    if entry is not None:
        kind = entry["type"]
        try:
            if kind == "categorical":
                choices = list(entry["choices"])
                if {str(v) for v in values} <= {str(c) for c in choices}:
                    return CategoricalDistribution(choices), True
            elif is_numeric and entry["low"] <= numeric.min() and numeric.max() <= entry["high"]:
                if kind == "float":
                    return FloatDistribution(float(entry["low"]), float(entry["high"]), log=bool(entry.get("log")),
                                             step=entry.get("step")), True
                return IntDistribution(int(entry["low"]), int(entry["high"]), log=bool(entry.get("log")),
                                       step=int(entry.get("step") or 1)), True
        except (KeyError, TypeError, ValueError):
            pass
    if is_numeric:
        lo, hi = float(numeric.min()), float(numeric.max())
        return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 20), False
    return CategoricalDistribution(sorted({str(v) for v in values})), False


def _value(distribution, value: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return next(c for c in distribution.choices if str(c) == str(value))
    return int(value) if isinstance(distribution, IntDistribution) else float(value)


def rebuild_study(trials: pd.DataFrame, params: list[str], space: dict[str, dict] | None = None):
    """An in-memory Optuna study with one COMPLETE trial per row (value: ``best_valid_bpc``), and the names of
    the parameters whose distribution came from the search space."""
    import optuna

    distributions, from_space = {}, []
    for name in params:
        dist, known = _distribution((space or {}).get(name), trials[name].dropna())
        distributions[name] = dist
        if known:
            from_space.append(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize")
    for _, row in trials.iterrows():
        present = {k: d for k, d in distributions.items() if pd.notna(row.get(k))}
        study.add_trial(optuna.trial.create_trial(params={k: _value(d, row[k]) for k, d in present.items()},
                                                  distributions=present, value=float(row["best_valid_bpc"])))
    return study, from_space


def ped_anova(trials: pd.DataFrame, params: list[str], space: dict[str, dict] | None = None) -> tuple[dict, list]:
    """optuna-dashboard's importances of ``params`` over ``trials`` (one family's completed search trials)."""
    import optuna

    study, from_space = rebuild_study(trials, params, space)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA warns on few trials per regime; the caption says how many
        imp = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
    return imp, from_space


def spearman(trials: pd.DataFrame, params: list[str]) -> dict[str, float]:
    rho = {}
    for name in params:
        x = pd.to_numeric(trials[name], errors="coerce")
        ok = x.notna()
        if ok.sum() >= 3 and x[ok].nunique() > 1:
            rho[name] = abs(float(pd.Series(x[ok]).rank().corr(trials.loc[ok, "best_valid_bpc"].rank())))
    return rho


def varying(trials: pd.DataFrame, params: list[str]) -> list[str]:
    return [p for p in params if p in trials and trials[p].dropna().astype(str).nunique() > 1]


def family_importances(done: pd.DataFrame, params: list[str],
                       space: dict[str, dict] | None = None) -> pd.DataFrame:
    """``family, parameter, importance, method, n_trials, domain`` per family with at least 2 completed trials
    (``domain``: ``search space`` or ``observed range``), most important first within a family."""
    rows = []
    for family in sorted_families(done["family"]):
        trials = done[done["family"] == family]
        names = varying(trials, params)
        if len(trials) < 2 or not names:
            continue
        try:
            imp, from_space = ped_anova(trials, names, space)
            method = PED_ANOVA
        except Exception:  # optuna missing or a case PED-ANOVA refuses
            imp, from_space, method = spearman(trials, names), [], SPEARMAN
        for name, value in sorted(imp.items(), key=lambda kv: -kv[1]):
            rows.append({"family": family, "parameter": name, "importance": float(value), "method": method,
                         "n_trials": len(trials),
                         "domain": "search space" if name in from_space else "observed range"})
    return pd.DataFrame(rows, columns=["family", "parameter", "importance", "method", "n_trials", "domain"])


def mean_importance(table: pd.DataFrame) -> pd.Series:
    """Each parameter's mean importance over the families (0 where a family does not vary it), highest first."""
    if table.empty:
        return pd.Series(dtype=float)
    wide = table.pivot_table(index="parameter", columns="family", values="importance", aggfunc="first")
    return wide.fillna(0.0).mean(axis=1).sort_values(ascending=False, kind="stable").astype(float)


__all__ = ["PED_ANOVA", "SPEARMAN", "family_importances", "mean_importance", "ped_anova", "rebuild_study",
           "spec_search_space"]
