"""`make ui` / study/ui.py: the printed link opens the study's runs table in MLflow's UI (not the
GenAI overview), checked in headless Chromium against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from study.record.layout import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it as root)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium(*args: str, timeout: float = 120) -> str:
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,800",
                          "--virtual-time-budget=20000", *args], capture_output=True, text=True, timeout=timeout)
    return out.stdout


def open_ui(uri: str, study: str, port: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, str(REPO / "study" / "ui.py"), "--study", study, "--tracking-uri", uri,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    line = server.stdout.readline()
    url = re.search(r"(http://\S+)", line).group(1)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server, url
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer on port {port}")


def test_the_printed_link_opens_the_study_runs_table(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("demo")  # as a study recorded before the experiment kind existed
    for name in ("search-0000-nlstm-d2", "search-0001-stacked-d2"):
        run = client.create_run(experiment, run_name=name, tags={"nlstm.kind": "trial"})
        client.log_metric(run.info.run_id, "valid_bpc", 2.0)
        client.set_terminated(run.info.run_id)
    port = free_port()
    server, url = open_ui(uri, "demo", port)
    try:
        assert url == f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs"
        assert client.get_experiment(experiment).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT
        dom = chromium("--dump-dom", url)
        assert "search-0000-nlstm-d2" in dom and "search-0001-stacked-d2" in dom, dom[-3000:]
        shot = tmp_path / "ui.png"
        chromium(f"--screenshot={shot}", url)
        assert shot.stat().st_size > 10_000
        if os.environ.get("NLSTM_UPDATE_DOCS_SCREENSHOT"):  # regenerate docs/images/mlflow-runs.png
            shutil.copyfile(shot, REPO / "docs" / "images" / "mlflow-runs.png")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the session we started: mlflow server and its worker
        server.wait(timeout=30)
        server.stdout.close()
