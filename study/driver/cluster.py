"""What a study needs when its trials run on other machines (``--address``).

- **Code**: a node that never saw the checkout has the same Python environment but not the
  project, so every trial failed with ``ModuleNotFoundError: No module named 'study.trials.trainable'``.
  The driver ships ``nlstm`` and ``study`` to every node with Ray's ``runtime_env``
  (``py_modules``). It always ships with ``--address``: an installed copy of another version on a
  node would otherwise be imported silently, and the upload is small (a few hundred KB, cached by
  Ray per content hash).
- **Storage**: Tune's experiment state and checkpoints must be where every node can write them:
  a folder mounted at the same path on every node, or an object store URI (``s3://...``, through
  pyarrow, with ``?endpoint_override=http://HOST:PORT`` or ``$AWS_ENDPOINT_URL`` for an
  S3-compatible server). Each node uses its own credentials (environment or instance role); none
  are shipped.
- **Tracking**: trials write MLflow themselves, so with ``--address`` the store must be a server
  every node reaches (``mlflow server``); a sqlite file of the driver is refused.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from study.record.store import HTTP_LIMITS, scheme_of

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PACKAGES = ("nlstm", "study")  # what a trial imports (dashboards is the driver's)
SHIP_EXCLUDES = ["__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/"]
# Set on the driver, needed by the trials on every node (a remote node does not inherit the driver's environment).
FORWARDED_ENV = (*HTTP_LIMITS, "PYTHONWARNINGS", "MLFLOW_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
DRIVER_LOCAL_STORES = ("sqlite", "file", "")
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
BINDING_FILE = "record.json"


class ClusterError(ValueError):
    """The study cannot run on this cluster as asked; the message is one line for the user."""


def runtime_env() -> dict[str, Any]:
    """The job's ``runtime_env``: the project's packages and the environment the trials need."""
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"py_modules": [str(REPO_ROOT / name) for name in SHIPPED_PACKAGES], "excludes": SHIP_EXCLUDES,
            "env_vars": env_vars}


def check_tracking_for_cluster(tracking_uri: str) -> None:
    """Trials on other machines cannot write a sqlite file (or a file store) of the driver."""
    if scheme_of(tracking_uri) in DRIVER_LOCAL_STORES:
        raise ClusterError(
            f"--address: the tracking store {tracking_uri} is a file of this machine that trials on other nodes "
            "cannot write; start a tracking server (`mlflow server --backend-store-uri sqlite:////abs/mlflow.db "
            "--artifacts-destination /abs/mlartifacts --host HOST --port PORT`) and pass --tracking-uri "
            "http://HOST:PORT")


@dataclass(frozen=True)
class Storage:
    """Where Tune keeps a study's experiments and checkpoints: ``path`` inside ``filesystem``
    (None: the local file system). ``location`` is how the user names it (shown in messages)."""

    location: str
    path: str
    filesystem: pafs.FileSystem | None = None

    def join(self, *parts: str) -> Storage:
        path = "/".join([self.path.rstrip("/"), *parts])
        location = self.location.split("?", 1)[0].rstrip("/") + "/" + "/".join(parts)
        return Storage(location, path, self.filesystem)

    def location_of(self, path: str) -> str:
        """How the user names ``path`` (a path inside this storage's file system)."""
        if self.filesystem is None or not path.startswith(self.path):
            return path
        return self.location.split("?", 1)[0].rstrip("/") + path[len(self.path.rstrip("/")):]

    @property
    def fs(self) -> pafs.FileSystem:
        return self.filesystem or pafs.LocalFileSystem()

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        path = f"{self.path}/{name}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{name}") as f:
            f.write(text.encode())

    def delete(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)


def resolve_storage(given: str | None, address: str | None, study_dir: Path) -> Storage:
    """``--storage`` as a ``Storage``, checked by a real write; the default ``<study_dir>/ray`` only
    for a local Ray (a folder of the driver that other nodes cannot reach)."""
    if not given:
        if address:
            raise ClusterError(
                "--address: Tune's trials and checkpoints need storage that every node can reach; pass --storage "
                "/shared/folder (mounted at the same path on every node) or --storage s3://bucket/prefix "
                "(?endpoint_override=http://HOST:PORT for an S3-compatible server)")
        path = str(study_dir / "ray")
        return Storage(path, path)
    scheme = scheme_of(given)
    if scheme in ("", "file"):
        path = Path(given.removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():  # not created here: a missing shared mount would silently become a local folder
            raise ClusterError(f"--storage {given}: no such folder (create it, or mount the shared folder there)")
        storage = Storage(str(path), str(path))
    elif scheme in OBJECT_STORE_SCHEMES:
        try:
            fs, path = pafs.FileSystem.from_uri(given)
        except (ValueError, OSError) as e:
            raise ClusterError(f"--storage {given}: {str(e).splitlines()[0]}") from None
        storage = Storage(given, path.rstrip("/"), fs)
    else:
        raise ClusterError(f"--storage {given}: expected a folder or an object store URI "
                           f"({', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)})")
    check_storage(storage)
    return storage


def check_storage(storage: Storage) -> None:
    """Write, read back and delete a small file: fails in one line on a missing bucket, bad
    credentials, an unreachable endpoint or a read-only folder."""
    name = f".nlstm-write-test-{uuid.uuid4().hex[:8]}"
    try:
        storage.write_text(name, "ok")
        if storage.read_text(name) != "ok":
            raise OSError("a file written there could not be read back")
        storage.fs.delete_file(f"{storage.path}/{name}")
    except (OSError, ValueError) as e:
        raise ClusterError(f"--storage {storage.location}: cannot write there ({str(e).splitlines()[0]})") from None


def bind_storage(storage: Storage, binding: dict[str, str]) -> None:
    """A record's folder in ``--storage`` (``<storage>/<study>/<parent run id>``) holds that
    record's ``record.json``; a folder holding another record's is refused, never reused."""
    text = storage.read_text(BINDING_FILE)
    if text is not None:
        try:
            recorded = json.loads(text)
        except ValueError:
            recorded = None
        if recorded != binding:
            raise ClusterError(f"--storage: {storage.location} holds the Ray trials of another record "
                               f"({BINDING_FILE} there says {text.strip()[:200]}); pass another --storage or "
                               "--restart")
        return
    storage.write_text(BINDING_FILE, json.dumps(binding, indent=1))


