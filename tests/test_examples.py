"""Each script in examples/ runs as a researcher would run it, on tiny settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}


def run_example(name: str, *args: str, cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_train_one_model(tmp_path):
    out = run_example("train_one_model.py", "--epochs", "1", "--max-steps-per-epoch", "5", "--budget", "5000",
                      cwd=tmp_path)
    assert "nested LSTM, depth 2" in out and "epoch 1: train" in out and "test " in out


@pytest.mark.slow
def test_search_without_yaml(tmp_path):
    out = run_example("search_without_yaml.py", "--samples", "2", "--epochs", "1", "--steps", "3", cwd=tmp_path)
    assert "best: {'arch'" in out and "valid_bpc" in out


def test_study_to_pandas(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo")
    for family, bpc in [("nlstm-d2", 2.1), ("nlstm-d2", 2.2), ("stacked-d2", 2.0), ("single-d1", 1.9)]:
        run = client.create_run(experiment, tags={"nlstm.kind": "trial", "nlstm.status": "completed",
                                                  "nlstm.family": family, "nlstm.phase": "evaluate"})
        client.log_metric(run.info.run_id, "best_valid_bpc", bpc)
        client.log_metric(run.info.run_id, "num_params", 20000)
        client.set_terminated(run.info.run_id)
    out = run_example("study_to_pandas.py", "--study", "demo", "--tracking-uri", uri, "--out", "p.png", cwd=tmp_path)
    assert "nlstm-d2        2  2.15" in out and (tmp_path / "p.png").stat().st_size > 1000
