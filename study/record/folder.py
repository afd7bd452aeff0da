"""The study folder belongs to exactly one MLflow record, and to one live driver at a time.

``<output>/<name>/`` holds the trials' checkpoints (``checkpoints/``, part of the record: interrupted
trials continue from them), the default Optuna storage (``optuna.db``) and Tune's experiments
(``ray/``, a disposable cache: nothing is read back from it). ``record.json`` names the record the
folder belongs to (written atomically); a folder that does not provably belong (another store,
experiment, parent run or record version, or no readable ``record.json`` and no Optuna storage bound to
this record's run) is set aside under ``set-aside/``, never reused, and the study starts cleanly.

A live driver holds ``.lock`` (an ``flock`` that dies with its process): a second driver, of the same
study on another store say, is refused instead of setting aside the first one's live folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BINDING_FILE = "record.json"
CACHE_ENTRIES = ("ray", "checkpoints", "optuna.db", "search_results.json", "best")
SET_ASIDE = "set-aside"
LOCK_FILE = ".lock"


class FolderInUse(RuntimeError):
    """Another live driver uses the study folder."""


class FolderLock:
    """``<study_dir>/.lock``, held with ``flock`` for the driver's life (released when its process ends,
    however it ends); the holder's pid is written in it for the message."""

    def __init__(self, study_dir: Path) -> None:
        self.path = study_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderInUse(f"{self.path.parent} is in use by another driver (pid {holder}); wait for it to end, "
                              "or give this one another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class RecordBinding:
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_hash: str
    storage: str = ""  # where the Ray experiments are (<study_dir>/ray, or a record's folder in --storage)
    record_version: int = 1  # study.record.layout.RECORD_VERSION of the code that wrote the folder (absent: 1)

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
    if present and recorded is None and _optuna_owners(study_dir / "optuna.db") == {binding.parent_run_id}:
        note = (f"{binding_file} was missing or damaged; the folder's Optuna storage names this study's run "
                f"{binding.parent_run_id[:8]}, so the folder is kept and {BINDING_FILE} written again")
    elif present and recorded != binding:
        destination = study_dir / SET_ASIDE / time.strftime("%Y%m%d-%H%M%S")
        destination.mkdir(parents=True, exist_ok=True)
        for name in [*present, BINDING_FILE]:
            if (study_dir / name).exists():
                shutil.move(str(study_dir / name), str(destination / name))
        why = ("it has no record.json" if recorded is None else
               f"it belongs to {_describe(recorded)}, not {_describe(binding)}")
        note = (f"the Ray results in {study_dir} are not this study's record ({why}); "
                f"set aside in {destination}, starting cleanly")
    staging = binding_file.with_name(f".{BINDING_FILE}.{os.getpid()}")  # never a half-written binding
    staging.write_text(json.dumps(asdict(binding), indent=1))
    os.replace(staging, binding_file)
    return note


def _optuna_owners(path: Path) -> set[str]:
    """The MLflow parent runs that the Optuna studies in ``path`` are bound to (each study carries its run,
    ``study.search.optuna_store.PARENT_ATTR``); empty when there is no readable Optuna storage there. The
    proof that a folder whose ``record.json`` was lost is still this record's."""
    if not path.is_file() or path.stat().st_size == 0:
        return set()
    import optuna

    from study.search.optuna_store import PARENT_ATTR

    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}", skip_table_creation=True)
        try:
            return {str(s.user_attrs.get(PARENT_ATTR)) for s in
                    optuna.get_all_study_summaries(storage, include_best_trial=False)}
        finally:
            storage.remove_session()
            storage.engine.dispose()
    except Exception:  # damaged, not an Optuna storage, another schema version: no proof
        return set()


def _describe(b: RecordBinding) -> str:
    return f"store {b.tracking_uri} run {b.parent_run_id[:8]} (study hash {b.study_hash[:8]}, Ray storage {b.storage})"
