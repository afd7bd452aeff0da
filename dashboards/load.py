"""A study's MLflow runs as tidy pandas frames (the layout is ``docs/mlflow-layout.md``).

- ``trials``: one row per trial run: identity tags (phase, arch, depth, family, config hash, seed),
  its ``state`` (completed | running | pruned | failed), every hyper-parameter (typed), the final
  metrics and the memory-timescale metrics; ablation factors (``factor.<name>``) joined from the
  config run above it; the next record's tags (``candidate_activation``, ``code_version``,
  ``record_version``, ``cpus``, ``threads``) and ``stop_reason`` (recorded, or derived where certain:
  :mod:`dashboards.stop_reason`; ``stop_reason_source`` says which), empty where not recorded.
- ``configs``: one row per config run of the evaluate/ablation phases.
- ``histories``: the long per-epoch frame ``run_id, metric, step, value`` from
  ``MlflowClient.get_metric_history`` (``step`` is the 1-based epoch); :func:`epoch_frame` pivots it.

Only the public MLflow client API is used, so the same code reads a sqlite file or a tracking
server, also while a study is still writing to it.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient

from dashboards.stop_reason import derive_stop_reason
from study.record.layout import (
    CANDIDATE_TAG,
    CODE_VERSION_TAG,
    CPUS_TAG,
    EPOCH_METRICS,
    FINAL_METRICS,
    PARENT_RUN_TAG,
    PHASES,
    RECORD_VERSION_TAG,
    STOP_REASON_TAG,
    TAG,
    THREADS_TAG,
    factors_of,
)

IDENTITY_TAGS = ("kind", "phase", "study", "arch", "depth", "family", "config_hash", "seed", "trial_id", "status",
                 "fail_reason")
# Tags of the next record (study.record.layout); absent on older runs, where the columns stay empty ("not recorded").
RECORD_TAGS = {"candidate_activation": CANDIDATE_TAG, "code_version": CODE_VERSION_TAG,
               "record_version": RECORD_VERSION_TAG, "cpus": CPUS_TAG, "threads": THREADS_TAG}
# Params that are consequences of others (or bookkeeping), not hyper-parameters a search chooses.
# Hyper-parameters also logged per epoch as a metric of the same name (the learning rate, which the plateau
# schedule lowers): a run's row keeps the configured value; the epochs' values are in its history.
SCHEDULED_PARAMS = ("lr",)
DERIVED_PARAMS = frozenset({"seed", "width", "embedding_dim", "num_params", "trial_id", "config_hash", "parent_id",
                            "study", "phase", "family", "data_fingerprint"})
STATES = ("completed", "running", "pruned", "failed")


class StoreError(RuntimeError):
    """The tracking store does not exist or cannot be read."""


class StudyNotFoundError(LookupError):
    """The store has no experiment of that name."""


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The store ``study/run.py`` writes by default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on an existing store; never creates one (MLflow would silently make an empty sqlite file)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
        if path is None or not path.is_file():
            raise StoreError(f"no MLflow store at {tracking_uri} (run a study first, or pass --tracking-uri)")
    elif parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme else tracking_uri)
        if not path.is_dir():
            raise StoreError(f"no MLflow store at {tracking_uri}")
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        with _few_http_retries(), warnings.catch_warnings():
            # MLflow's sqlite store trips SQLAlchemy's "noload is deprecated" warning on first use; not ours to fix.
            warnings.filterwarnings("ignore", message=r".*noload.*", category=DeprecationWarning)
            client.search_experiments(max_results=1)
    except Exception as exc:  # a server that is down, a file that is not an MLflow database, ...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StoreError(f"cannot read the MLflow store at {tracking_uri}: {first_line[:200]}") from exc
    return client


@contextlib.contextmanager
def _few_http_retries(retries: int = 1, timeout_s: int = 15) -> Iterator[None]:
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: v for k, v in names.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@dataclass
class StudyData:
    """Everything the report needs, read once."""

    name: str
    tracking_uri: str
    experiment_id: str
    parent: dict[str, Any] | None  # run_id, status, tags, params of the study's parent run
    trials: pd.DataFrame
    configs: pd.DataFrame
    histories: pd.DataFrame
    param_names: list[str] = field(default_factory=list)  # hyper-parameters as logged on trial runs
    n_duplicates: int = 0  # trial runs dropped because another run had the same nlstm.trial_id
    loaded_at: pd.Timestamp = field(default_factory=lambda: pd.Timestamp.now(tz="UTC"))
    client: MlflowClient | None = field(default=None, repr=False)

    @property
    def phases_done(self) -> list[str]:
        tags = (self.parent or {}).get("tags", {})
        return [p for p in PHASES if tags.get(f"{TAG}phase.{p}") == "done"]

    def state_counts(self) -> pd.DataFrame:
        """Trial runs per phase and state (all four states always present as columns)."""
        if self.trials.empty:
            return pd.DataFrame(columns=["phase", *STATES, "total"])
        counts = pd.crosstab(self.trials["phase"].fillna("?"), self.trials["state"])
        counts = counts.reindex(columns=list(STATES), fill_value=0)
        counts["total"] = counts.sum(axis=1)
        order = [p for p in PHASES if p in counts.index] + [p for p in counts.index if p not in PHASES]
        return counts.loc[order].rename_axis(None, axis=1).reset_index(names="phase")


def load_study(name: str, tracking_uri: str, histories: bool = True) -> StudyData:
    """Read study ``name`` (an MLflow experiment) from ``tracking_uri``."""
    client = open_store(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments() if e.name != "Default")
        known = ", ".join(names) if names else "none"
        raise StudyNotFoundError(f"no study {name!r} in {tracking_uri} (studies there: {known})")
    runs = _all_runs(client, experiment.experiment_id)
    kinds: dict[str, list[Run]] = {"study": [], "config": [], "trial": []}
    for run in runs:
        kinds.setdefault(run.data.tags.get(TAG + "kind", ""), []).append(run)
    parents = sorted(kinds["study"], key=lambda r: r.info.start_time or 0)
    parent = None
    if parents:
        p = parents[-1]
        parent = {"run_id": p.info.run_id, "status": p.info.status, "tags": dict(p.data.tags),
                  "params": dict(p.data.params), "start_time": _timestamp(p.info.start_time),
                  "end_time": _timestamp(p.info.end_time)}
    configs = pd.DataFrame([_config_row(r) for r in kinds["config"]])
    trials, param_names = _trial_frame(kinds["trial"], configs)
    before = len(trials)
    trials = _drop_duplicate_trials(trials)
    hist = load_histories(client, list(trials["run_id"])) if histories and not trials.empty else _empty_history()
    return StudyData(name=name, tracking_uri=tracking_uri, experiment_id=experiment.experiment_id, parent=parent,
                     trials=trials, configs=configs, histories=hist, param_names=param_names,
                     n_duplicates=before - len(trials), client=client)


def _all_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _timestamp(ms: int | None) -> pd.Timestamp:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else pd.NaT


def parse_value(text: str | None) -> Any:
    """An MLflow param string back to int/float/bool/None where it plainly is one."""
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered in ("none", "null", ""):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _state(run: Run) -> str:
    tag = run.data.tags.get(TAG + "status")
    if tag in ("completed", "pruned", "failed"):
        return tag
    if tag == "interrupted":  # its driver was stopped; a rerun of the study continues it
        return "running"
    if run.info.status in ("RUNNING", "SCHEDULED"):
        return "running"
    if run.info.status in ("FAILED", "KILLED"):
        return "failed"
    return "completed" if math.isfinite(run.data.metrics.get("best_valid_bpc", math.nan)) else "failed"


def _config_row(run: Run) -> dict[str, Any]:
    tags = run.data.tags
    row: dict[str, Any] = {"run_id": run.info.run_id, "run_name": run.info.run_name}
    for key in ("phase", "config_hash", "arch", "depth", "family"):
        row[key] = tags.get(TAG + key)
    row.update({f"factor.{name}": parse_value(value) for name, value in factors_of(tags).items()})
    row.update({k: parse_value(v) for k, v in run.data.params.items() if k not in row})
    return row


def _trial_frame(runs: list[Run], configs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    rows, param_names = [], set()
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        row: dict[str, Any] = {
            "run_id": run.info.run_id, "run_name": run.info.run_name, "mlflow_status": run.info.status,
            "start_time": _timestamp(run.info.start_time), "end_time": _timestamp(run.info.end_time),
            "parent_run_id": tags.get(PARENT_RUN_TAG),
        }
        for key in IDENTITY_TAGS:
            row[key] = tags.get(TAG + key)
        for key, tag in RECORD_TAGS.items():
            row[key] = tags.get(tag)
        row["state"] = _state(run)
        row["stop_reason"], row["stop_reason_source"] = derive_stop_reason(
            tags.get(STOP_REASON_TAG), tags.get(TAG + "status"), tags.get(TAG + "fail_reason"), run.data.params,
            metrics.get("epochs_run"))
        if row["candidate_activation"] is None:
            row["candidate_activation"] = _candidate_of(tags, run.data.params)
        for key, value in run.data.params.items():
            param_names.add(key)  # arch and depth are hyper-parameters too when a search samples them
            if key not in row and key not in metrics:
                row[key] = parse_value(value)
        row.update(metrics)
        for key in SCHEDULED_PARAMS:  # the configured value, not its last epoch's (a schedule may have lowered it)
            if key in run.data.params:
                row[key] = parse_value(run.data.params[key])
        if "num_params" not in metrics and "num_params" in run.data.params:
            row["num_params"] = parse_value(run.data.params["num_params"])
        rows.append(row)
    columns = ["run_id", "run_name", "mlflow_status", "start_time", "end_time", "parent_run_id", *IDENTITY_TAGS,
               *RECORD_TAGS, "state", "stop_reason", "stop_reason_source", "budget", "num_params", *FINAL_METRICS]
    frame = pd.DataFrame(rows)
    for col in columns:
        if col not in frame:
            frame[col] = pd.Series(dtype=float if col in FINAL_METRICS or col == "budget" else object)
    frame = frame.loc[:, ~frame.columns.duplicated()]
    for col in ("depth", "seed", "cpus", "threads"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    for col in ("budget", "num_params", *FINAL_METRICS):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").astype(float)
    if frame["family"].isna().any():  # older runs: rebuild the family name from arch and depth
        rebuilt = frame["arch"].astype(str) + "-d" + frame["depth"].astype(str)
        frame["family"] = frame["family"].where(frame["family"].notna(), rebuilt.where(frame["arch"].notna()))
    if not configs.empty and not frame.empty:
        factors = [c for c in configs.columns if c.startswith("factor.")]
        if factors:
            frame = frame.merge(configs[["run_id", *factors]].rename(columns={"run_id": "parent_run_id"}),
                                on="parent_run_id", how="left")
    if not frame.empty:
        frame = frame.sort_values("start_time", kind="stable").reset_index(drop=True)
    hyper = sorted(p for p in param_names if p not in DERIVED_PARAMS)
    return frame, hyper


def _candidate_of(tags: dict[str, str], params: dict[str, str]) -> str | None:
    """An older run's outer candidate: a stacked, single or depth-1 model has the LSTM's tanh by definition; a
    nested model's is its ``candidate_activation`` param where logged, else unknown (None)."""
    arch, depth = tags.get(TAG + "arch") or params.get("arch"), tags.get(TAG + "depth") or params.get("depth")
    if arch in ("stacked", "single") or str(depth) == "1":
        return "tanh"
    value = params.get("candidate_activation")
    return value if value in ("identity", "tanh") else None


def _drop_duplicate_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """A resumed study re-attaches to its runs; should a trial still have two, keep the completed/latest one."""
    if trials.empty or trials["trial_id"].isna().all():
        return trials
    rank = trials["state"].map({s: i for i, s in enumerate(STATES)})
    ordered = trials.assign(_rank=rank).sort_values(["_rank", "end_time"], ascending=[True, False], kind="stable")
    keyed = ordered[ordered["trial_id"].notna()].drop_duplicates("trial_id")
    kept = pd.concat([keyed, ordered[ordered["trial_id"].isna()]])
    return kept.drop(columns="_rank").sort_values("start_time", kind="stable").reset_index(drop=True)


def _empty_history() -> pd.DataFrame:
    return pd.DataFrame({"run_id": pd.Series(dtype=str), "metric": pd.Series(dtype=str),
                         "step": pd.Series(dtype="int64"), "value": pd.Series(dtype=float),
                         "timestamp": pd.Series(dtype="int64")})


def load_histories(client: MlflowClient, run_ids: list[str], metrics: tuple[str, ...] = EPOCH_METRICS,
                   workers: int = 4) -> pd.DataFrame:
    """The long per-epoch frame ``run_id, metric, step, value, timestamp`` (one MLflow call per run and metric)."""

    def fetch(job: tuple[str, str]) -> list[tuple[str, str, int, float, int]]:
        run_id, key = job
        return [(run_id, key, m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key)]

    jobs = [(run_id, key) for run_id in run_ids for key in metrics]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = [row for chunk in pool.map(fetch, jobs) for row in chunk]
    if not rows:
        return _empty_history()
    frame = pd.DataFrame(rows, columns=["run_id", "metric", "step", "value", "timestamp"])
    # A final metric logged without a step lands at step 0; the per-epoch history starts at 1.
    return frame[frame["step"] >= 1].reset_index(drop=True)


def pivot_epochs(histories: pd.DataFrame, run_ids: list[str] | pd.Series | None = None) -> pd.DataFrame:
    """The long per-epoch frame of :func:`load_histories` as one row per (run, step), a column per metric;
    empty (no rows) when none of ``run_ids`` has a history. A step logged twice keeps its last value (a
    resumed trial may re-log an epoch)."""
    hist = histories if run_ids is None else histories[histories["run_id"].isin(list(run_ids))]
    if hist.empty:
        return pd.DataFrame(columns=["run_id", "step", *EPOCH_METRICS])
    hist = hist.sort_values("timestamp", kind="stable").drop_duplicates(["run_id", "metric", "step"], keep="last")
    return hist.pivot(index=["run_id", "step"], columns="metric", values="value").reset_index().rename_axis(
        None, axis=1)


def epoch_frame(data: StudyData, run_ids: list[str] | pd.Series | None = None) -> pd.DataFrame:
    """One row per (run, epoch) with the epoch metrics as columns and the run's identity joined on."""
    wide = pivot_epochs(data.histories, run_ids)
    if wide.empty:
        return pd.DataFrame(columns=["run_id", "epoch", *EPOCH_METRICS])
    wide = wide.rename(columns={"step": "epoch"})
    ident = ["run_id", "phase", "arch", "depth", "family", "budget", "seed", "config_hash", "state"]
    return wide.merge(data.trials[ident], on="run_id", how="left")
