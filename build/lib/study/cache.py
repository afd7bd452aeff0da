"""The study folder's Ray experiments are a working cache of exactly one MLflow record.

Tune's experiment folders (``<output>/<name>/ray/``), ``search_results.json`` and ``best/`` say
which trials ran and how they ended, but the MLflow study run is the record. Resuming from a
folder written for another store, experiment, parent run or study file made the driver claim
phases done whose runs were never recorded in the store it was given, and copy the old search's
configurations into the new store. ``record.json`` names the record the cache belongs to; a
cache that does not provably belong (another record, or no ``record.json``) is set aside, never
reused, and the study starts cleanly.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BINDING_FILE = "record.json"
CACHE_ENTRIES = ("ray", "search_results.json", "best", "optuna.db")
SET_ASIDE = "set-aside"


@dataclass(frozen=True)
class RecordBinding:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_hash: str
    storage: str = ""  # where the Ray experiments are (<study_dir>/ray, or a record's folder in --storage)

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def claim_cache(study_dir: Path, binding: RecordBinding) -> str | None:
    """Make ``study_dir``'s cache belong to ``binding``; returns a one-line note if a foreign
    cache was set aside."""
    study_dir.mkdir(parents=True, exist_ok=True)
    binding_file = study_dir / BINDING_FILE
    present = [name for name in CACHE_ENTRIES if (study_dir / name).exists()]
    try:
        recorded = RecordBinding(**json.loads(binding_file.read_text())) if binding_file.is_file() else None
        if recorded is not None and not recorded.storage:  # written before the storage was recorded: the default
            recorded = RecordBinding(**(asdict(recorded) | {"storage": str(study_dir / "ray")}))
    except (OSError, ValueError, TypeError):
        recorded = None
    note = None
    if present and recorded != binding:
        destination = study_dir / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
        destination.mkdir(parents=True, exist_ok=True)
        for name in [*present, BINDING_FILE]:
            if (study_dir / name).exists():
                shutil.move(str(study_dir / name), str(destination / name))
        why = ("it has no record.json" if recorded is None else
               f"it belongs to {_describe(recorded)}, not {_describe(binding)}")
        note = (f"the Ray results in {study_dir} are not this study's record ({why}); "
                f"set aside in {destination}, starting cleanly")
    binding_file.write_text(json.dumps(asdict(binding), indent=1))
    return note


def _describe(b: RecordBinding) -> str:
    return f"store {b.tracking_uri} run {b.parent_run_id[:8]} (study hash {b.study_hash[:8]}, Ray storage {b.storage})"
