"""The MLflow store a study records into: its URI checked, reached and initialised safely.

Everything here runs before the study writes anything, so that a mistyped URI, a dead server or
a folder the study cannot write fails in seconds with one line instead of after minutes of
retries (MLflow's HTTP client retries for about four minutes by default, and a bare word such as
``notaurl`` silently becomes a sqlite file of that name).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient

from study.record.redact import mask_url

# Schemes MLflow's tracking stores understand (database URIs may carry a driver: `postgresql+psycopg2`).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
KNOWN_SCHEMES = DATABASE_SCHEMES + ("http", "https", "file", "databricks")
CONNECT_TIMEOUT_S = 10.0
# Bounds for every MLflow HTTP call of the driver and its trials (MLflow's defaults retry 7 times
# with exponential back-off and a 120 s timeout: minutes before a dead server is reported).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class StoreError(ValueError):
    """The tracking store cannot be used; the message is one line for the user."""


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """The absolute tracking URI: ``--tracking-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///$PWD/mlflow.db``. A path ending in ``.db`` means that sqlite file; anything else
    that is not a known scheme is refused (it would silently become a file-store folder)."""
    cwd = (cwd or Path.cwd()).resolve()
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        return f"sqlite:///{cwd / 'mlflow.db'}"
    if "://" not in uri:
        if uri.endswith(".db"):
            return f"sqlite:///{(cwd / Path(uri).expanduser()).resolve()}"
        raise StoreError(f"tracking URI {mask_url(uri)!r} is neither a URI ({', '.join(KNOWN_SCHEMES)}) nor a sqlite "
                         "file path ending in .db")
    scheme = scheme_of(uri)
    if scheme not in KNOWN_SCHEMES:
        raise StoreError(f"tracking URI {mask_url(uri)!r}: unknown scheme {scheme!r} "
                         f"(expected one of {', '.join(KNOWN_SCHEMES)})")
    if scheme == "sqlite":
        path = uri.split("://", 1)[1]
        if path.startswith("/") and not path.startswith("//"):  # sqlite:///relative -> absolute for every worker
            return f"sqlite:///{(cwd / path[1:]).resolve()}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:////abs/path`` URI (None for other stores or in-memory)."""
    if scheme_of(uri) != "sqlite":
        return None
    path = uri.split("://", 1)[1]
    return Path(path[1:]) if path.startswith("//") else None


def check_store(uri: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, in one line, if the store cannot be written (sqlite) or reached (a server)."""
    db = sqlite_path(uri)
    if db is not None:
        check_path_names(db, "tracking store")
        check_writable_folder(db.parent, f"tracking store {db}")
        if db.exists() and not os.access(db, os.W_OK):
            raise StoreError(f"tracking store {db} is not writable")
        check_sqlite_file(db, "tracking store")
        return
    if scheme_of(uri) in DATABASE_SCHEMES:
        _check_database(uri, timeout_s)
        return
    if scheme_of(uri) in ("http", "https"):
        health, shown = uri.rstrip("/") + "/health", mask_url(uri)
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:  # noqa: S310 (http(s) only)
                if response.status != 200:
                    raise StoreError(f"tracking server {shown} answered {response.status} at /health")
        except urllib.error.HTTPError as e:
            raise StoreError(f"tracking server {shown} answered {e.code} at /health: is it an MLflow server?") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StoreError(f"tracking server {shown} cannot be reached ({reason}); start it "
                             "(`mlflow server --host 127.0.0.1 --port PORT ...`) or fix --tracking-uri") from None


def _check_database(uri: str, timeout_s: float) -> None:
    """A database store (PostgreSQL, MySQL, SQL Server) must have its driver installed and answer."""
    import sqlalchemy

    shown = mask_url(uri)  # never print a password
    connect_args = {"connect_timeout": int(timeout_s)} if scheme_of(uri) in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as e:
        raise StoreError(f"tracking store {shown}: its database driver is not installed ({e}); "
                         f"pip install {e.name}") from None
    except Exception as e:  # sqlalchemy wraps every driver's connection errors differently
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StoreError(f"tracking store {shown} cannot be reached ({reason})") from None


QUICK_CHECK_LIMIT = 1 << 30  # bytes: a larger database is only opened, not scanned, before a study starts
LOCK_WAIT_S = 30.0  # how long the check waits for another process's write to end before it says so


def check_sqlite_file(path: Path, what: str) -> None:
    """A damaged sqlite file (emptied is fine: an empty database) is one line naming it, before anything is
    written; MLflow and SQLAlchemy would otherwise fail later with three lines that do not name the file."""
    import sqlite3

    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=LOCK_WAIT_S)) as db:
            if path.stat().st_size <= QUICK_CHECK_LIMIT:
                verdict = db.execute("PRAGMA quick_check(1)").fetchone()[0]
                if verdict != "ok":
                    raise sqlite3.DatabaseError(verdict)
            else:
                db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise StoreError(f"{what} {path} is locked by another process that stopped in the middle of a write "
                             "(a paused or hung driver of this study?): end or resume it, then rerun") from None
        raise StoreError(f"{what} {path} is damaged ({e}): restore it from a copy, or move it away and start "
                         "the study over (its runs are in that file)") from None


def existing_ancestor(path: Path) -> Path:
    """The deepest folder of ``path`` (or ``path`` itself) that exists; a name the file system
    refuses (ENAMETOOLONG, ELOOP) counts as missing."""
    for candidate in [path, *path.parents]:
        try:
            if candidate.exists():
                return candidate
        except OSError:
            continue
    return Path(path.anchor or "/")


def check_path_names(path: Path, what: str) -> None:
    """Refuse, in one line, a path the file system cannot hold: a name longer than its NAME_MAX
    (255 bytes on ext4, xfs, tmpfs) or a whole path longer than its PATH_MAX. Such a path makes
    every later call fail with ENAMETOOLONG, from deep inside pathlib, sqlite or pyarrow."""
    path = Path(os.path.abspath(path))
    anchor = existing_ancestor(path)
    try:
        name_max, path_max = os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    for name in path.parts[1:]:
        size = len(os.fsencode(name))
        if size > name_max:
            shown = name if len(name) <= 24 else name[:24] + "..."
            raise StoreError(f"{what}: the name {shown!r} in it is {size} bytes long; the file system allows at most "
                             f"{name_max} (ENAMETOOLONG)")
    size = len(os.fsencode(str(path)))
    if size >= path_max:
        raise StoreError(f"{what}: the path is {size} bytes long; the file system allows at most {path_max - 1} "
                         "(ENAMETOOLONG)")


def check_writable_folder(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise StoreError(f"{what}: folder {folder} does not exist")
    try:  # os.access says yes to root on a read-only file system; only a real write tells
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nlstm-write-test-"):
            pass
    except OSError as e:
        raise StoreError(f"{what}: folder {folder} is not writable ({e.strerror})") from None


def limit_http_retries() -> None:
    """Bound MLflow's HTTP retries for this process and the trials it starts (they inherit the
    environment), unless the user set them."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An advisory ``flock`` on the folder itself: no lock file is left behind."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_client(uri: str) -> MlflowClient:
    """An MLflow client on a store that is fully initialised.

    Two drivers creating the same fresh sqlite database at once raced in MLflow's schema
    migrations ("duplicate column name: step", "table latest_metrics already exists"), and any
    reader opening it mid-migration could fail the same way. A missing database is therefore
    created and migrated under a temporary name, under a lock on its folder, and renamed into
    place: every process sees either no store or a complete one."""
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        with _folder_lock(db.parent):
            if not db.exists():
                staging = db.with_name(f".{db.name}.{os.getpid()}.creating")
                try:
                    MlflowClient(f"sqlite:///{staging}").search_experiments(max_results=1)
                    os.replace(staging, db)
                finally:
                    staging.unlink(missing_ok=True)
    client = MlflowClient(uri)
    client.search_experiments(max_results=1)
    return client
