"""Checkpoint files: written atomically, read without ever running code from them.

``torch.load(weights_only=True)`` rebuilds only tensors and plain containers (dict, list, tuple,
str, int, float, bool, None); a crafted pickle naming any other callable (``os.system``, ...) is
refused instead of executed. Everything a checkpoint holds must therefore be of those types:
the RNG states below are stored as tensors and plain values, not as NumPy arrays or Python's
own state tuple objects.

A file that cannot be read back (truncated by a full disk, overwritten, crafted) is a
``CheckpointError`` with a one-line message naming the file, never a traceback from deep inside
the unpickler.
"""

from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "load_checkpoint_file", "rng_states", "save_checkpoint_file", "set_rng_states"]


class CheckpointError(Exception):
    """A checkpoint that cannot be used: unreadable, damaged, or written by a different run (one-line message)."""


def _why_unloadable(exc: BaseException) -> str:
    """A short reason for a failed ``weights_only`` load. torch's own messages run to twenty lines
    (refusals) or say only "[Errno 22] Invalid argument" (a truncated zip)."""
    text = str(exc)
    refused = re.search(r"GLOBAL (\S+)", text)
    if isinstance(exc, pickle.UnpicklingError) and refused:
        return f"it would call {refused.group(1)}: refused, a checkpoint holds only tensors and plain data"
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        return "it holds objects other than tensors and plain data: refused"
    return "truncated, or not a torch checkpoint"


def save_checkpoint_file(obj: dict[str, Any], path: str | Path) -> Path:
    """Atomic write: a run killed while saving never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded on the CPU with ``weights_only=True``; CheckpointError if it is not one."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # any parse failure: truncated zip, bad pickle, refused global, EOF, ...
        reason = _why_unloadable(exc)
        raise CheckpointError(f"checkpoint {path} is damaged or unsafe and was not loaded ({reason})") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def rng_states() -> dict[str, Any]:
    """Every RNG that decides the run's future (dropout, any sampling), as tensors and plain values."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` saved (CUDA only where CUDA is available)."""
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
