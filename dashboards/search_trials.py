"""The search phase's trials per family, by how they entered the tuning: what the expected-best curves draw
from (:mod:`dashboards.expected_best`) and the tuning budget each family spent (:func:`SearchTrials.ended`,
which the verdicts' "ends better" needs equal; :func:`dashboards.stop_reason.tuning_gap`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass
class SearchTrials:
    """The search phase's trials, by how they enter the curves."""

    entering: pd.DataFrame  # completed, finite best valid BPC: at the search fidelity
    pruned: pd.Series  # per family
    failed: pd.Series
    running: pd.Series
    total: pd.Series  # every search trial per family
    distinct: pd.Series  # distinct configurations (config_hash) among the ended trials, per family

    @property
    def ended(self) -> dict[str, int]:
        """Search trials per family that have ended (completed, pruned or failed): its tuning budget spent."""
        return (self.total.sub(self.running, fill_value=0)).astype(int).to_dict()

    @property
    def repeated(self) -> dict[str, int]:
        """Ended trials per family that trained a configuration an earlier trial of the family had trained."""
        ended = self.ended
        return {f: n - int(self.distinct.get(f, n)) for f, n in ended.items() if n > int(self.distinct.get(f, n))}


def search_trials(trials: pd.DataFrame) -> SearchTrials:
    """The search trials of ``trials``; a run superseded by its own trial's next run (its checkpoint was lost,
    ``study.trials.mlflow_run``) is not a trial of its own and is left out."""
    search = trials[trials["phase"] == "search"] if len(trials) else trials
    if len(search) and "fail_reason" in search:
        search = search[~search["fail_reason"].astype(str).str.startswith("superseded")]
    if search.empty:
        empty = pd.Series(dtype="int64")
        return SearchTrials(search, empty, empty, empty, empty, empty)
    state = search["state"]
    finite = pd.Series(np.isfinite(pd.to_numeric(search["best_valid_bpc"], errors="coerce").astype(float)),
                       index=search.index)

    def per_family(mask: pd.Series) -> pd.Series:
        return mask.groupby(search["family"]).sum().astype(int)

    ended = search[state != "running"]
    config = ended["config_hash"] if "config_hash" in ended else pd.Series(None, index=ended.index, dtype=object)
    config = config.where(config.notna(), "run " + ended.index.astype(str))  # not recorded: a configuration of its own
    distinct = config.groupby(ended["family"]).nunique()
    return SearchTrials(search[(state == "completed") & finite], per_family(state == "pruned"),
                        per_family((state == "failed") | ((state == "completed") & ~finite)),
                        per_family(state == "running"), search.groupby("family").size(), distinct)
