"""Download -> verify -> cache, and the errors a corpus loader can raise.

Rules (from shared/data/README.md), and why:
- Every file is checked against a known sha256 before use, wherever it was found (data dir,
  cache or a fresh download): results are only comparable if the bytes are the same.
- A mismatch is an error naming the file and both hashes. A bad file is never silently
  re-used, re-downloaded or overwritten: the user must look at it (a truncated copy, a different
  preprocessing, a tampered mirror all look the same to a loader).
- A download goes to a temporary file in the destination folder and is renamed into place only
  after its hash matched (``os.replace`` is atomic on one filesystem), so an interrupted or
  wrong download never leaves a file that a later run would take for the real one.
- Only ``urllib`` (no extra dependency); tqdm shows progress when installed and on a terminal.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

__all__ = [
    "ChecksumError",
    "CorpusError",
    "CorpusNotFoundError",
    "DATA_DIR_ENV",
    "CACHE_DIR_ENV",
    "default_cache_dir",
    "default_data_dir",
    "download_file",
    "sha256_file",
    "verify_file",
]

DATA_DIR_ENV = "NLSTM_DATA_DIR"
CACHE_DIR_ENV = "NLSTM_CACHE_DIR"
_CHUNK = 1 << 20


class CorpusError(Exception):
    """Base class of the data layer's errors (all carry a one-line message)."""


class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The corpus files are neither in the data dir nor the cache and cannot be downloaded."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) pairs
        return str(self.args[0]) if self.args else ""


class ChecksumError(CorpusError, ValueError):
    """A file's sha256 differs from the expected one."""


def default_cache_dir() -> Path:
    """``$NLSTM_CACHE_DIR`` if set, else ``~/.cache/nlstm`` (where downloads are kept)."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nlstm"


def default_data_dir() -> Path | None:
    """``$NLSTM_DATA_DIR`` if set (a read-only folder of pre-fetched corpora), else None."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: str | Path, sha256: str | None) -> str:
    """Return the file's sha256; raise ChecksumError if ``sha256`` is given and differs."""
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256.lower():
        raise ChecksumError(
            f"checksum mismatch for {path}: expected sha256 {sha256}, got {actual} "
            "(the file is left untouched; replace or delete it)"
        )
    return actual


def _progress(total: int | None, desc: str):  # -> tqdm bar or None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    # disable=None: no bar when stderr is not a terminal (CI logs, tests).
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def download_file(url: str, dest: str | Path, sha256: str | None, timeout: float = 60.0) -> str:
    """Download ``url`` to ``dest`` atomically, verifying ``sha256`` on the fly.

    Returns the sha256. On a mismatch raises ChecksumError and leaves nothing at ``dest``;
    network errors propagate as ``urllib.error.URLError`` / ``OSError``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            bar = _progress(int(length) if length and length.isdigit() else None, dest.name)
            try:
                while chunk := resp.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
        actual = h.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(
                f"checksum mismatch for download {url}: expected sha256 {sha256}, got {actual} "
                "(nothing was written to the cache)"
            )
        os.replace(tmp, dest)
        return actual
    finally:
        tmp.unlink(missing_ok=True)
