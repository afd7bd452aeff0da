"""A study's trial checkpoints (where unfinished training is recorded, keyed by trial key) and ``model.pt``.

``<root>/<trial key>/trainer.pt`` (``nlstm.trainer.Trainer``'s checkpoint: weights, optimizer, RNG
states, data position, carried state) and ``trial.json`` (whose trial and record it is, and what
``model.pt`` needs). The root is ``<output>/<name>/checkpoints`` for a local study, or
``<storage>/<name>/<parent run id>/checkpoints`` with ``--storage`` (a shared folder or an object store
that every node reaches).

A trial writes its checkpoint after each epoch and *before* that epoch is logged to MLflow, so a
logged epoch always has its checkpoint; a trial that starts again (an interrupted study, a lost
node) continues from it and logs only the epochs MLflow does not have. Tune's own checkpoints are
not used: Ray's folders are a disposable cache, and nothing here is a pickle (the trainer's file is
read with ``weights_only=True``, ``trial.json`` as JSON).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from nlstm.checkpoint import CheckpointError, load_checkpoint_file
from nlstm.data import Vocabulary

TRAINER_FILE, META_FILE = "trainer.pt", "trial.json"


@dataclass(frozen=True)
class CheckpointStore:
    """Checkpoints under ``path`` in ``filesystem`` (None: the local file system); ``location`` names it
    for the user. Picklable: it travels to the trials with their context."""

    location: str
    path: str
    filesystem: pafs.FileSystem | None = None

    @property
    def _fs(self) -> pafs.FileSystem:
        return self.filesystem or pafs.LocalFileSystem()

    def _dir(self, key: str) -> str:
        return f"{self.path.rstrip('/')}/{key}"

    def save(self, key: str, trainer: Any, meta: dict[str, Any]) -> None:
        """Replace ``key``'s checkpoint by ``trainer``'s state, atomically on a local folder (a run killed
        mid-write keeps its previous checkpoint)."""
        with tempfile.TemporaryDirectory(prefix="nlstm-ckpt-") as staging:
            trainer.save_checkpoint(Path(staging) / TRAINER_FILE)
            (Path(staging) / META_FILE).write_text(json.dumps(meta))
            if self.filesystem is None:
                target = Path(self._dir(key))
                target.parent.mkdir(parents=True, exist_ok=True)
                fresh = target.with_name(f".{key}.{uuid.uuid4().hex[:8]}")
                shutil.copytree(staging, fresh)
                old = target.with_name(f".{key}.old.{uuid.uuid4().hex[:8]}")
                if target.exists():
                    os.replace(target, old)
                os.replace(fresh, target)
                shutil.rmtree(old, ignore_errors=True)
            else:  # an object store: each file is replaced whole by its upload
                self._fs.create_dir(self._dir(key), recursive=True)
                for name in (TRAINER_FILE, META_FILE):
                    pafs.copy_files(str(Path(staging) / name), f"{self._dir(key)}/{name}",
                                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self._fs)

    def fetch(self, key: str, into: Path) -> dict[str, Any] | None:
        """Copy ``key``'s checkpoint into the folder ``into``; returns its ``trial.json``, or None if it has
        none. A checkpoint without its metadata, or with metadata that is not JSON, is a CheckpointError."""
        folder = self._dir(key)
        if self._fs.get_file_info(f"{folder}/{TRAINER_FILE}").type != pafs.FileType.File:
            return None
        into.mkdir(parents=True, exist_ok=True)
        try:
            for name in (TRAINER_FILE, META_FILE):
                pafs.copy_files(f"{folder}/{name}", str(into / name), source_filesystem=self._fs,
                                destination_filesystem=pafs.LocalFileSystem())
            meta = json.loads((into / META_FILE).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.location}/{key} is incomplete ({e})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint {self.location}/{key}: {META_FILE} is not a JSON object")
        return meta

    def delete(self, key: str) -> None:
        folder = self._dir(key)
        if self._fs.get_file_info(folder).type == pafs.FileType.Directory:
            self._fs.delete_dir(folder)


def save_model_file(path: Path, model: torch.nn.Module, model_config: dict[str, Any], vocab: Vocabulary,
                    key: str) -> Path:
    """``model.pt``: the weights with what is needed to rebuild and use them."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}  # loadable without a GPU
    torch.save({"state_dict": weights, "model_config": model_config, "vocab": vocab.to_json(), "trial_id": key}, path)
    return path


def model_file_from_checkpoint(checkpoint_dir: Path, out: Path) -> Path | None:
    """``model.pt`` with the best weights of a trial's Tune checkpoint (None if it has none).

    The checkpoint is read with ``weights_only=True`` (it runs no code); a damaged one is a one-line
    ``nlstm.checkpoint.CheckpointError`` naming the file."""
    meta_path, state_path = checkpoint_dir / "trial.json", checkpoint_dir / "trainer.pt"
    if not (meta_path.is_file() and state_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    state = load_checkpoint_file(state_path)
    weights = {k: v.cpu() for k, v in (state["best_state_dict"] or state["model"]).items()}
    torch.save({"state_dict": weights, "model_config": meta["model_config"], "vocab": meta["vocab"],
                "trial_id": meta["key"]}, out)
    return out


