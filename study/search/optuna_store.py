"""The search's Optuna study, stored where ``optuna.load_study`` and ``optuna-dashboard`` find it.

Ray's ``OptunaSearch`` without a storage keeps its study in memory, pickled inside Tune's
searcher state: nothing outside the driver can open it. Here it lives in an Optuna storage that
the searcher writes as the search runs: ``<output>/<name>/optuna.db`` (sqlite) by default, or
``--optuna-storage`` (an RDB URL such as ``postgresql://...``, or a journal file path ending in
``.log``). Only the driver writes it (the searcher runs in the driver), so a sqlite file of the
driver is fine on a cluster.

There is one Optuna study per search family, named ``<study>/<family>`` (``<study>`` for a search
without families), with its objective named ``valid_bpc``; each carries the MLflow parent run it
belongs to (user attribute ``nlstm.parent_run_id``): a resumed study continues the same Optuna
studies, and a study of another record in a shared storage is refused, never mixed in.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

from study.record.redact import mask_url

PARENT_ATTR = "nlstm.parent_run_id"
DEFAULT_FILE = "optuna.db"
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")


class OptunaStoreError(ValueError):
    """The Optuna storage cannot be used for this study; one line for the user."""


def resolve_optuna_url(given: str | None, study_dir: Path) -> str:
    """``--optuna-storage`` checked; the default is ``sqlite:///<study_dir>/optuna.db``."""
    if not given:
        return f"sqlite:///{study_dir / DEFAULT_FILE}"
    if "://" in given:
        scheme = given.split("://", 1)[0].split("+", 1)[0].lower()
        if scheme not in RDB_SCHEMES:
            raise OptunaStoreError(f"--optuna-storage {mask_url(given)}: unknown scheme {scheme!r} (an RDB URL: "
                                   f"{', '.join(RDB_SCHEMES)}; or a journal file path ending in .log)")
        return given
    if given.endswith(".log"):
        return str(Path(given).expanduser().resolve())
    raise OptunaStoreError(f"--optuna-storage {given}: expected an RDB URL (sqlite:////abs/optuna.db, "
                           "postgresql://...) or a journal file path ending in .log")


def check_optuna_file(url: str) -> None:
    """A damaged sqlite Optuna storage is one ``OptunaStoreError`` naming it (an emptied one is an empty
    database: ``prepare_studies`` then refuses it if the record has trials it lost)."""
    if url.startswith("sqlite:///"):
        from study.record.store import StoreError, check_sqlite_file

        try:
            check_sqlite_file(Path(url.removeprefix("sqlite:///")), "the Optuna storage")
        except StoreError as e:
            raise OptunaStoreError(str(e)) from None


def check_optuna_storage(url: str) -> None:
    """A file storage (a sqlite URL or a journal ``.log`` path, as ``resolve_optuna_url`` returns
    it) checked before the study writes anything: a name the file system cannot hold, or a folder
    (or an existing file) that cannot be written, failed only once the search started, after the
    study's record was written. Server URLs (postgresql://, ...) are not checked here."""
    from study.record.store import StoreError, check_path_names, check_writable_folder, existing_ancestor

    if "://" in url:
        if url.split("://", 1)[0].split("+", 1)[0].lower() != "sqlite":
            return
        path = url.split("://", 1)[1].split("?", 1)[0]
        path = path[1:] if path.startswith("/") else path  # sqlite:////abs -> /abs, sqlite:///rel -> rel
        if path in ("", ":memory:"):
            return
    else:
        path = url
    file = Path(path).expanduser().absolute()
    what = "--optuna-storage"
    try:
        check_path_names(file, what)
        folder = existing_ancestor(file.parent)
        if folder != file.parent and "://" in url:  # sqlite creates the file, not its folder
            raise StoreError(f"{what}: folder {file.parent} does not exist")
        check_writable_folder(folder, what)
        if file.exists():
            with open(file, "ab"):  # os.access says yes to root on a read-only mount; opening tells
                pass
    except StoreError as e:
        raise OptunaStoreError(str(e)) from None
    except OSError as e:
        raise OptunaStoreError(f"{what}: cannot write {file} ({e.strerror or e})") from None


def open_storage(url: str) -> BaseStorage:
    """The storage at ``url``; a damaged database or journal is one ``OptunaStoreError`` naming it."""
    check_optuna_file(url)
    try:
        if "://" in url:
            return _rdb_storage(url)
        from optuna.storages.journal import JournalFileBackend

        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except OptunaStoreError:
        raise
    except Exception as e:  # SQLAlchemy and the journal wrap a damaged file differently
        raise OptunaStoreError(f"the Optuna storage {mask_url(url)} cannot be opened ({_first_line(e)}): if the "
                               "file is damaged, restore it from a copy, or move it away and rerun with "
                               "--restart") from None


def _rdb_storage(url: str, attempts: int = 3) -> BaseStorage:
    """Optuna creates its tables on first use; two drivers doing that at once on an empty PostgreSQL
    database collide (``UniqueViolation`` on ``CREATE TYPE``), and the loser's transaction is rolled back:
    its next try finds the tables."""
    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except sqlalchemy.exc.IntegrityError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def prepare_studies(url: str, names: list[str], parent_run_id: str, recorded: dict[str, int],
                    restart: bool = False) -> BaseStorage:
    """The storage, with each Optuna study of ``names`` created (once, before the searcher opens it: no
    table race), its objective named ``valid_bpc`` and bound to ``parent_run_id``. ``recorded``: search
    trials the MLflow record has per study name; a storage without them lost them (replaced, emptied) and
    is refused before anything is written. ``restart`` deletes earlier studies of those names."""
    storage = open_storage(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
            for name in names:
                if name in existing and restart:
                    optuna.delete_study(study_name=name, storage=storage)
                    existing.pop(name)
                if name in existing:
                    owner = existing[name].user_attrs.get(PARENT_ATTR)
                    if owner != parent_run_id:
                        raise OptunaStoreError(
                            f"--optuna-storage: {mask_url(url)} holds an Optuna study {name!r} of another MLflow "
                            f"record (parent run {owner}, not {parent_run_id}); pass --restart to replace it or "
                            "another --optuna-storage")
                elif recorded.get(name) and not restart:
                    raise OptunaStoreError(
                        f"the Optuna storage {mask_url(url)} has no study {name!r}, but the MLflow record has "
                        f"{recorded[name]} of its search trials: the storage was replaced, emptied or is not this "
                        "study's; restore it (or pass the right --optuna-storage), or rerun with --restart")
            for name in names:
                if name not in existing:
                    study = optuna.create_study(storage=storage, study_name=name, direction="minimize",
                                                load_if_exists=True)
                    study.set_metric_names(["valid_bpc"])
                    study.set_user_attr(PARENT_ATTR, parent_run_id)
    except OptunaStoreError:
        raise
    except Exception as e:
        raise OptunaStoreError(f"the Optuna storage {mask_url(url)} cannot be used ({_first_line(e)}): if the file "
                               "is damaged, restore it from a copy, or move it away and rerun with --restart") from None
    return storage
