"""Encoded corpora cached on disk and memory-mapped, so a trial starts in about a second.

text8 and enwik8 are 100M symbols. Encoding them takes seconds and, held as int64, 800 MB in
every trial process. So the streams are stored once, in the smallest integer dtype that holds
the vocabulary (``smallest_dtype``: uint8 for both), as NumPy ``.npy`` files next to the
download cache, and opened with ``mmap_mode="c"``: pages come from the OS page cache, shared by
every trial on a node, and a write (nothing writes) would stay private to its process.

A cache entry can never be used for other data:
- its key is the sha256 of the source files' sha256s, the corpus name, the load options and
  ``FORMAT`` (bumped whenever tokenisation changes), and the key stored inside the entry is
  compared, not just the folder's name;
- ``meta.json`` carries a checksum of itself, and each stream the sha256 of its bytes, verified
  on every load (~0.1 s per 100 MB). A mismatch, a missing or truncated file: the entry is
  rebuilt, with a warning.
Entries are written to a temporary folder and renamed into place, so an interrupted build
leaves nothing a later load would take for an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlstm.data.vocab import Vocabulary

__all__ = ["FORMAT", "cache_key", "cached_streams", "smallest_dtype"]

FORMAT = 1
SPLITS = ("train", "valid", "test")
Streams = tuple[Vocabulary, torch.Tensor, torch.Tensor, torch.Tensor]


def smallest_dtype(vocab_size: int) -> torch.dtype:
    """uint8 up to 256 symbols, int16 up to 32768, else int32 (embedding ids are converted per batch)."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 15:
        return torch.int16
    return torch.int32


def cache_key(corpus: str, checksums: Mapping[str, str], options: Mapping[str, Any]) -> str:
    """sha256 over everything the streams are a function of."""
    material = {"format": FORMAT, "corpus": corpus, "files": dict(checksums), "options": dict(options)}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=list).encode()).hexdigest()


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _entry_dir(root: Path, corpus: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in corpus)[:40]
    return root / "tokens" / f"{safe}-{key[:24]}"


def _load_entry(entry: Path, key: str) -> tuple[Streams, str]:
    """The entry's streams (memory-mapped) and fingerprint; ValueError/OSError saying what is wrong."""
    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("meta_sha256") != _meta_checksum(meta):
        raise ValueError("meta.json does not match its checksum")
    if meta.get("key") != key or meta.get("format") != FORMAT:
        raise ValueError("entry was written for other source files or options")
    vocab = Vocabulary.from_json(meta["vocab"])
    streams = []
    for split in SPLITS:
        info = meta["splits"][split]
        array = np.load(entry / f"{split}.npy", mmap_mode="c", allow_pickle=False)
        if array.dtype != np.dtype(info["dtype"]) or array.shape != (info["length"],):
            raise ValueError(f"{split}.npy has dtype {array.dtype} and shape {array.shape}, expected "
                             f"{info['dtype']} x {info['length']}")
        if hashlib.sha256(memoryview(array)).hexdigest() != info["sha256"]:
            raise ValueError(f"{split}.npy does not match its checksum")
        streams.append(torch.from_numpy(array))
    return (vocab, *streams), meta["fingerprint"]


def _write_entry(entry: Path, key: str, corpus: str, streams: Streams, fingerprint: str) -> None:
    vocab, *tensors = streams
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        splits = {}
        for split, t in zip(SPLITS, tensors, strict=True):
            array = np.ascontiguousarray(t.numpy())
            np.save(tmp / f"{split}.npy", array, allow_pickle=False)
            splits[split] = {"dtype": array.dtype.str, "length": int(array.size),
                             "sha256": hashlib.sha256(memoryview(array)).hexdigest()}
        meta = {"format": FORMAT, "key": key, "corpus": corpus, "vocab": vocab.to_json(), "fingerprint": fingerprint,
                "splits": splits}
        meta["meta_sha256"] = _meta_checksum(meta)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            shutil.rmtree(entry)  # a damaged entry; processes that mapped its files keep their pages
        try:
            os.replace(tmp, entry)
        except OSError:
            if not entry.is_dir():  # else another process won the race with the same content
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_streams(root: Path, corpus: str, key: str, build: Callable[[], Streams],
                   fingerprint: Callable[[Streams], str]) -> tuple[Streams, str | None]:
    """The streams of ``corpus`` from the cache under ``root`` (memory-mapped), else ``build()``-ed and
    cached; with their fingerprint (None when the cache cannot be written: the caller computes it)."""
    entry = _entry_dir(root, corpus, key)
    if (entry / "meta.json").exists():
        try:
            return _load_entry(entry, key)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"token cache {entry} is damaged ({exc}); rebuilding it", stacklevel=3)
    streams = build()
    vocab, *tensors = streams
    dtype = smallest_dtype(len(vocab))
    streams = (vocab, *(t.to(dtype) for t in tensors))
    fp = fingerprint(streams)
    try:
        _write_entry(entry, key, corpus, streams, fp)
        return _load_entry(entry, key)
    except (OSError, ValueError, KeyError) as exc:  # read-only or full disk; or a concurrent rebuild
        warnings.warn(f"cannot write the token cache {entry} ({exc}); using the streams in memory", stacklevel=3)
        return streams, fp
