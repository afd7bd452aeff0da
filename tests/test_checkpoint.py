"""Checkpoints run no code when loaded, damaged ones are one line naming the file and ``--fresh``,
and every RNG state survives a ``weights_only`` round trip."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nlstm.checkpoint import CheckpointError, load_checkpoint_file, rng_states, save_checkpoint_file, set_rng_states

TINY_RUN = ["--corpus", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "2", "--width", "8",
            "--embedding-dim", "4", "--batch-size", "4", "--bptt", "8", "--quiet", "--sample", "0"]


class Exploit:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_exploit(path: Path, form: str, marker: Path) -> Path:
    payload = {"model": Exploit(marker)}
    if form == "raw":  # a plain pickle stream, which torch.load also accepts (legacy format)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:  # torch's zip format, data.pkl inside
        torch.save(payload, path)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nlstm.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


@pytest.mark.parametrize("form", ["raw", "zip"])
def test_the_crafted_files_are_real_exploits(tmp_path, form):
    """Guards the next test: unsafe loading of these files does run the command."""
    marker = tmp_path / "pwned"
    path = write_exploit(tmp_path / "checkpoint.pt", form, marker)
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:  # raw: the payload is unpickled as the "magic number" (running it), then refused
        assert form == "raw"
    assert marker.exists()


@pytest.mark.parametrize("form", ["raw", "zip"])
def test_resuming_from_a_crafted_checkpoint_runs_no_code(tmp_path, form):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    ckpt = write_exploit(out / "checkpoint.pt", form, marker)
    proc = run_cli(*TINY_RUN, "--out", str(out), cwd=tmp_path)
    assert not marker.exists()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert str(ckpt) in proc.stderr and "--fresh" in proc.stderr and "Traceback" not in proc.stderr

    with pytest.raises(CheckpointError, match="it would call posix.system: refused"):
        load_checkpoint_file(ckpt)
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line_and_fresh_starts_over(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*TINY_RUN, "--out", str(out), cwd=tmp_path).returncode == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    for cut in (len(data) // 2, 10, 0):
        ckpt.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="checkpoint .* is damaged.*truncated") as err:
            load_checkpoint_file(ckpt)
        assert "\n" not in str(err.value)
    ckpt.write_bytes(data[: len(data) // 2])
    proc = run_cli(*TINY_RUN, "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert str(ckpt) in proc.stderr and "--fresh" in proc.stderr and "Errno" not in proc.stderr

    fresh = run_cli(*TINY_RUN, "--out", str(out), "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "resumed" not in fresh.stdout and load_checkpoint_file(ckpt)["progress"]["epoch"] == 1


def test_a_checkpoint_of_something_else_is_one_line(tmp_path):
    from nlstm import CharLM, ModelConfig
    from nlstm.data import SyntheticConfig, synthetic_corpus
    from nlstm.trainer import TrainConfig, Trainer

    corpus = synthetic_corpus(SyntheticConfig(train_chars=2000, valid_chars=200, test_chars=200))
    trainer = Trainer(CharLM(ModelConfig(vocab_size=len(corpus.vocab), width=8, embedding_dim=4)), corpus,
                      TrainConfig(batch_size=4, bptt=8))
    path = save_checkpoint_file({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt is incomplete or not a trainer checkpoint"):
        trainer.load_checkpoint(path)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint_file(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_file(tmp_path / "missing.pt")


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # ... and in python's
    path = save_checkpoint_file({"rng": rng_states()}, tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_states(load_checkpoint_file(path)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_model_file_from_a_crafted_tune_checkpoint_runs_no_code(tmp_path):
    pytest.importorskip("ray")
    from study.trials.checkpoints import model_file_from_checkpoint

    marker = tmp_path / "pwned"
    (tmp_path / "trial.json").write_text('{"key": "k", "model_config": {}, "vocab": "{}"}')
    write_exploit(tmp_path / "trainer.pt", "zip", marker)
    with pytest.raises(CheckpointError, match="trainer.pt is damaged or unsafe"):
        model_file_from_checkpoint(tmp_path, tmp_path / "model.pt")
    assert not marker.exists()
