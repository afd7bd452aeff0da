"""``tables/trials.csv``: one row per trial run, so anyone can re-plot a study with pandas alone.

Columns (documented in docs/report.md): identity (``study, phase, family, arch, depth, budget,
num_params, seed, trial_id, run_id``), how it ended (``status``: completed | pruned | failed |
running, as recorded; ``outcome``: learned | did not learn | failed | pruned | running, as the
report judges it, with ``outcome_reason``), results (``valid_bpc`` = the best validation BPC of
the run, ``test_bpc`` of the weights selected on validation, ``epochs_run``, ``train_time_s``,
``tokens_per_s``), the hyper-parameters and ablation factors that vary in the study, and the
long-range probe (``dependency_length``, ``closer_bpc``) where recorded. BPC is bits per
symbol; counts are integers.
"""

from __future__ import annotations

import pandas as pd

IDENTITY = ["study", "phase", "family", "arch", "depth", "budget", "num_params", "seed", "trial_id", "run_id"]
ENDING = ["status", "outcome", "outcome_reason"]
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
            out[column] = pd.to_numeric(out[column], errors="coerce").round().astype("Int64")
    return out.sort_values(["phase", "family", "seed", "trial_id"], kind="stable", na_position="last").reset_index(
        drop=True)
