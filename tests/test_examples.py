"""Each script in examples/ runs as a researcher would run it, on tiny settings, and writes nothing
into $HOME: each runs with HOME set to an empty folder that must stay empty.

The environment is a user's, not the suite's: the suite's own settings that keep libraries out of
$HOME (conftest.py) are removed, so the example itself must not write there (Tune's default
~/ray_results, Ray's token ~/.ray/auth_token). The user's pointers are set: NLSTM_CACHE_DIR (the
corpus and C++ build cache, built here too: NLSTM_CPP=1) and the XDG base directories, which
matplotlib's font cache and MLflow's telemetry id follow (they write under ~/.cache and ~/.config
otherwise, like any program using them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
SUITE_SETTINGS = ("RAY_AUTH_MODE", "MPLCONFIGDIR", "MLFLOW_DISABLE_TELEMETRY", "PYTEST_CURRENT_TEST", "XDG_CACHE_HOME",
                  "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME")


def user_env(tmp: Path) -> dict[str, str]:
    """A user's environment with an empty HOME under ``tmp``, the cache and XDG folders pointed at ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in SUITE_SETTINGS}
    (tmp / "home").mkdir()
    return env | {"PYTHONPATH": str(REPO), "HOME": str(tmp / "home"), "NLSTM_CPP": "1",
                  "NLSTM_CACHE_DIR": os.environ["NLSTM_CACHE_DIR"],  # the suite's temporary cache (conftest.py)
                  "XDG_CACHE_HOME": str(tmp / "xdg-cache"), "XDG_CONFIG_HOME": str(tmp / "xdg-config"),
                  "XDG_DATA_HOME": str(tmp / "xdg-data"), "XDG_STATE_HOME": str(tmp / "xdg-state")}


def run_example(name: str, *args: str, cwd: Path, timeout: float = 600) -> str:
    scratch = cwd / ".user"
    scratch.mkdir()
    env = user_env(scratch)
    out = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    home = Path(env["HOME"])
    written = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert not written, f"{name} wrote into $HOME: {written[:12]}"
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
