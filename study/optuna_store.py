"""The search's Optuna study, stored where ``optuna.load_study`` and ``optuna-dashboard`` find it.

Ray's ``OptunaSearch`` without a storage keeps its study in memory, pickled inside Tune's
searcher state: nothing outside the driver can open it. Here it lives in an Optuna storage that
the searcher writes as the search runs: ``<output>/<name>/optuna.db`` (sqlite) by default, or
``--optuna-storage`` (an RDB URL such as ``postgresql://...``, or a journal file path ending in
``.log``). Only the driver writes it (the searcher runs in the driver), so a sqlite file of the
driver is fine on a cluster.

The Optuna study is named after the study and carries the MLflow parent run it belongs to
(user attribute ``nlstm.parent_run_id``): a resumed study continues the same Optuna study, and a
study of another record in a shared storage is refused, never mixed in.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.storages import BaseStorage

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
            raise OptunaStoreError(f"--optuna-storage {given}: unknown scheme {scheme!r} (an RDB URL: "
                                   f"{', '.join(RDB_SCHEMES)}; or a journal file path ending in .log)")
        return given
    if given.endswith(".log"):
        return str(Path(given).expanduser().resolve())
    raise OptunaStoreError(f"--optuna-storage {given}: expected an RDB URL (sqlite:////abs/optuna.db, "
                           "postgresql://...) or a journal file path ending in .log")


def check_optuna_storage(url: str) -> None:
    """A file storage (a sqlite URL or a journal ``.log`` path, as ``resolve_optuna_url`` returns
    it) checked before the study writes anything: a name the file system cannot hold, or a folder
    (or an existing file) that cannot be written, failed only once the search started, after the
    study's record was written. Server URLs (postgresql://, ...) are not checked here."""
    from study.store import StoreError, check_path_names, check_writable_folder, existing_ancestor

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
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def prepare_study(url: str, name: str, parent_run_id: str, restart: bool = False) -> BaseStorage:
    """The storage, with the study ``name`` created (once, before the searcher opens it: no table
    race) and bound to ``parent_run_id``. ``restart`` deletes an earlier study of that name."""
    storage = open_storage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        if name in existing and restart:
            optuna.delete_study(study_name=name, storage=storage)
            existing.pop(name)
        if name in existing:
            owner = existing[name].user_attrs.get(PARENT_ATTR)
            if owner != parent_run_id:
                raise OptunaStoreError(
                    f"--optuna-storage: {url} holds an Optuna study {name!r} of another MLflow record (parent run "
                    f"{owner}, not {parent_run_id}); pass --restart to replace it or another --optuna-storage")
            return storage
        study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
        study.set_user_attr(PARENT_ATTR, parent_run_id)
    return storage
