"""Memory timescales as recorded by the study: ``timescale_l{k}`` / ``step_change_l{k}`` metrics and
the ``memories.npz`` example traces (computed by :mod:`nlstm.analysis` on held-out text).

Level 0 is the NLSTM's outer memory (deeper levels are nested inside it); layer 0 is the stacked
LSTM's bottom layer. The paper's second claim is that inner NLSTM memories move more slowly
(longer autocorrelation timescale, smaller mean step change) than the stacked LSTM's higher layers.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

LEVEL_METRIC = re.compile(r"^(timescale|step_change)_l(\d+)$")


def timescale_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """Long frame: one row per (run, level) with ``timescale`` and ``step_change`` (NaN where not recorded)."""
    columns = ["run_id", "family", "arch", "depth", "budget", "seed", "level", "timescale", "step_change"]
    metric_cols = [c for c in runs.columns if LEVEL_METRIC.match(str(c))]
    if runs.empty or not metric_cols:
        return pd.DataFrame(columns=columns)
    long = runs.melt(id_vars=["run_id", "family", "arch", "depth", "budget", "seed"], value_vars=metric_cols,
                     var_name="metric", value_name="value")
    parts = long["metric"].str.extract(LEVEL_METRIC)
    long = long.assign(kind=parts[0], level=parts[1].astype(int)).dropna(subset=["value"])
    if long.empty:
        return pd.DataFrame(columns=columns)
    wide = long.pivot_table(index=["run_id", "family", "arch", "depth", "budget", "seed", "level"], columns="kind",
                            values="value", aggfunc="first", dropna=False).reset_index().rename_axis(None, axis=1)
    for col in ("timescale", "step_change"):
        if col not in wide:
            wide[col] = np.nan
    wide = wide.dropna(subset=["timescale", "step_change"], how="all")
    return wide[columns].sort_values(["budget", "family", "level", "seed"], kind="stable").reset_index(drop=True)


def load_memories(client, run_id: str) -> dict[str, np.ndarray] | None:
    """The ``memories.npz`` artifact of a run as ``{"level_0": (steps, units), ..., "text": str}``; None if absent."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bar per download
    try:
        names = {f.path for f in client.list_artifacts(run_id)}
        if "memories.npz" not in names:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(client.download_artifacts(run_id, "memories.npz", tmp))
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
    except Exception:  # an artifact store that is unreachable must not break the report
        return None


def levels_of(memories: dict[str, np.ndarray]) -> list[np.ndarray]:
    keys = sorted((k for k in memories if k.startswith("level_")), key=lambda k: int(k.split("_")[1]))
    return [np.asarray(memories[k], dtype=float) for k in keys]
