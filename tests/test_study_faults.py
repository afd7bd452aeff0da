"""Faults and hostile files (issue 20): damaged stores are one line naming the file; two drivers never share
a live folder; a driver that lost its lease writes nothing more; a lost tracking server is one line and the
rerun closes what it could not; the one chance rule decides what the evaluate phase may re-run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from fault_harness import small_disk  # noqa: F401 (the fixture)
from mlflow import MlflowClient
from test_study_run import REPO, kind, runs_of, steps, study_file
from test_study_trust import ENV, driver, finish

from study.run import main

pytestmark = pytest.mark.slow
FAMILIES = """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.02, patience: null}
search:
  families: [{arch: nlstm, depth: 2}, {arch: single}]
  trials_per_family: 1
  space:
    dropout: {type: float, low: 0.0, high: 0.1}
  sampler: {type: random, seed: 0}
  scheduler: {type: none}
"""


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (len(lines), lines[:3], lines[-3:])
    return lines[0]


def _wait_for(tmp_path: Path, study: str, ready, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if (tmp_path / "mlflow.db").exists():
            try:
                if ready(*runs_of(tmp_path, study)):
                    return
            except Exception:
                continue
    raise AssertionError("the study never reached the state the test waits for")


# ------------------------------------------------------------------ item 5: damaged stores
@pytest.mark.parametrize("damage", ["empty", "half"])
def test_a_damaged_optuna_storage_is_one_line_naming_it(tmp_path, monkeypatch, ray_local, capsys, damage):
    spec = study_file(tmp_path, "dmg", FAMILIES)
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    spec.write_text(spec.read_text().replace("trials_per_family: 1", "trials_per_family: 2"))  # more to run
    db = tmp_path / "studies" / "dmg" / "optuna.db"
    data = db.read_bytes()
    db.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    capsys.readouterr()
    assert main(["--space", str(spec)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert str(db) in line, line
    assert ("has no study 'dmg/nlstm-d2', but the MLflow record has 1 of its search trials" in line
            if damage == "empty" else "is damaged" in line), line
    assert "restore it" in line
    _, runs = runs_of(tmp_path, "dmg")
    assert not [r for r in runs if r.info.status == "RUNNING"]  # nothing left RUNNING
    assert len(kind(runs, "trial")) == 2  # and nothing ran


def test_a_damaged_tracking_store_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    spec = study_file(tmp_path, "dmg", FAMILIES)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("other")
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2])
    assert main(["--space", str(spec)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"tracking store {db} is damaged" in line and "restore it from a copy" in line, line
    assert not (tmp_path / "studies").exists()


# ------------------------------------------------------------------ item 4: a full disk
def test_a_full_disk_is_one_line_and_the_study_finishes_once_space_is_freed(small_disk, tmp_path):  # noqa: F811
    """The store and the output on a small tmpfs that fills up mid-search: one line naming the folder, no
    trial spends an attempt on it; once space is freed the rerun finishes with exactly the trials asked for."""
    disk = small_disk(tmp_path / "disk", size_mb=96)
    spec = study_file(tmp_path, "full", FAMILIES.replace("epochs: 2", "epochs: 4")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 20000"))
    command = [sys.executable, str(REPO / "study" / "run.py"), "--space", str(spec), "--tracking-uri",
               str(disk.folder / "mlflow.db"), "--output", str(disk.folder / "studies")]
    first = disk.popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240  # a checkpoint is written before its epoch is logged
        checkpoints = disk.view / "studies" / "full" / "checkpoints"
        while time.monotonic() < deadline and first.poll() is None and not list(checkpoints.glob("*/trainer.pt")):
            time.sleep(0.2)
        disk.fill()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 1, out + err
    line = _one_line(err)
    assert "no space left on the device of" in line and str(disk.folder) in line, line
    assert "rerun the same command" in line and "interrupted" not in line, line
    disk.free()
    again = disk.run(command, cwd=tmp_path, env=ENV, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    # the record, read where the disk is mounted (MLflow resolves /proc/<pid>/root paths to the host's view)
    script = ("import json; from mlflow import MlflowClient; c = MlflowClient('sqlite:///{db}'); "
              "e = c.get_experiment_by_name('full'); print(json.dumps([[r.data.tags, sorted(m.step for m in "
              "c.get_metric_history(r.info.run_id, 'valid_bpc'))] for r in c.search_runs([e.experiment_id]) "
              "if r.data.tags.get('nlstm.kind') == 'trial']))").format(db=disk.folder / "mlflow.db")
    read = disk.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV)
    trials = json.loads(read.stdout.strip().splitlines()[-1])
    assert sorted(tags["nlstm.trial_id"] for tags, _ in trials) == ["nlstm-d2-search-000", "single-d1-search-000"]
    for tags, epochs in trials:
        assert tags["nlstm.status"] == "completed" and "nlstm.attempts" not in tags, tags
        assert epochs == [1, 2, 3, 4], tags["nlstm.trial_id"]


# ------------------------------------------------------------------ item 9: two drivers, one folder
def test_a_folder_in_use_by_a_live_driver_is_never_moved(tmp_path):
    """The same study on two stores with the same output folder: the second driver would set the first's
    live folder aside (another record); it is refused instead, and the first finishes."""
    spec = study_file(tmp_path, "busy", FAMILIES.replace("epochs: 2", "epochs: 4")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 30000"))
    first = driver(spec, tmp_path, "--tracking-uri", str(tmp_path / "a.db"))
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "studies" / "busy" / "record.json").exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        code, out, err = finish(driver(spec, tmp_path, "--tracking-uri", str(tmp_path / "b.db")), timeout=120)
        assert code == 1, out + err
        line = _one_line(err)
        assert f"{tmp_path / 'studies' / 'busy'} is in use by another driver (pid {first.pid})" in line, line
        assert not (tmp_path / "studies" / "busy" / "set-aside").exists()
    finally:
        code, out, err = finish(first)
    assert code == 0, out + err


# ------------------------------------------------------------------ item 10: fencing
def _pause_between_writes(process: subprocess.Popen, databases: list[Path], attempts: int = 100) -> None:
    """SIGSTOP ``process`` at a moment it holds no lock on the sqlite ``databases``. A driver stopped in the
    middle of a write blocks every other process's writes: that is the locked-store case (one line, tested
    on its own below), not the lease's."""
    for _ in range(attempts):
        process.send_signal(signal.SIGSTOP)
        try:
            for path in databases:
                with contextlib.closing(sqlite3.connect(path, timeout=0.5, isolation_level=None)) as db:
                    db.execute("BEGIN EXCLUSIVE")  # no other process reads or writes it now
                    db.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            process.send_signal(signal.SIGCONT)
            time.sleep(0.2)
    raise AssertionError("the driver was always in the middle of a write")


def test_a_store_held_by_a_process_stopped_mid_write_is_one_line_not_damaged(tmp_path, monkeypatch):
    """A real process takes the write lock of an Optuna storage and is stopped (SIGSTOP) holding it: the
    check says the file is locked by another process and what to do, not that it is damaged."""
    from study.record import store

    path = tmp_path / "optuna.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE t (x)")
        db.commit()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"db = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE'); db.execute('INSERT INTO t VALUES (1)')\n"
        "print('holding', flush=True); time.sleep(120)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        holder.send_signal(signal.SIGSTOP)
        monkeypatch.setattr(store, "LOCK_WAIT_S", 0.5)
        with pytest.raises(store.StoreError) as error:
            store.check_sqlite_file(path, "the Optuna storage")
        message = str(error.value)
        assert "is locked by another process" in message and "damaged" not in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_paused_driver_that_lost_its_lease_writes_nothing_more(tmp_path):
    """Driver A is paused (SIGSTOP) past its lease's staleness; driver B, from another folder, takes the study
    over and finishes it; A, resumed, exits in one line and leaves B's record as B left it."""
    spec = study_file(tmp_path, "paused", FAMILIES.replace("epochs: 2", "epochs: 3")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 20000"))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "b").mkdir()
    first = driver(spec, tmp_path, "--tracking-uri", store)
    try:
        _wait_for(tmp_path, "paused", lambda client, runs: any(steps(client, r) for r in kind(runs, "trial")))
        _pause_between_writes(first, [tmp_path / "mlflow.db", tmp_path / "studies" / "paused" / "optuna.db"])
        time.sleep(35)  # the lease is stale after 30 s without a heartbeat
        code, out, err = finish(driver(spec, tmp_path / "b", "--tracking-uri", store), timeout=300)
        assert code == 0 and "taking over the lease" in out, out + err
        client, runs = runs_of(tmp_path, "paused")
        finished = {r.info.run_id: (r.info.status, r.info.end_time, dict(r.data.tags)) for r in runs}
        first.send_signal(signal.SIGCONT)
        code, out, err = finish(first, timeout=120)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert code == 1, out + err
    line = _one_line(err)
    assert "another driver took over" in line and "wrote nothing more" in line, line
    client, runs = runs_of(tmp_path, "paused")
    assert {r.info.run_id: (r.info.status, r.info.end_time, dict(r.data.tags)) for r in runs} == finished
    assert kind(runs, "study")[0].info.status == "FINISHED"
    for r in kind(runs, "trial"):
        assert steps(client, r) == [1, 2, 3], r.info.run_name  # each epoch once, whoever trained it


# ------------------------------------------------------------------ item 6: the tracking server goes away
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=ENV | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


def test_a_tracking_server_that_dies_mid_study_is_one_line_and_the_rerun_closes_its_runs(tmp_path):
    spec = study_file(tmp_path, "srv", FAMILIES.replace("epochs: 2", "epochs: 6")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 30000"))
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(tmp_path, port)
    first = driver(spec, tmp_path, "--tracking-uri", uri)
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            time.sleep(0.5)
            exp = client.get_experiment_by_name("srv")
            runs = list(client.search_runs([exp.experiment_id])) if exp else []
            if any(steps(client, r) for r in kind(runs, "trial")):
                break
        _stop(server)
        code, out, err = finish(first, timeout=240)
        assert code == 1, out + err
        line = _one_line(err)
        assert f"{uri} is unreachable" in line and "rerun the same command once it is back" in line, line
        server = _mlflow_server(tmp_path, port)
        code, out, err = finish(driver(spec, tmp_path, "--tracking-uri", uri), timeout=300)
        assert code == 0, out + err
        exp = client.get_experiment_by_name("srv")
        runs = list(client.search_runs([exp.experiment_id]))
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert sorted(r.data.tags["nlstm.trial_id"] for r in kind(runs, "trial")) == ["nlstm-d2-search-000",
                                                                                      "single-d1-search-000"]
        assert all(r.data.tags["nlstm.status"] == "completed" and steps(client, r) == list(range(1, 7))
                   for r in kind(runs, "trial"))
    finally:
        if first.poll() is None:
            first.kill()
        _stop(server)


# ------------------------------------------------------------------ item 12: one chance rule
def test_search_trials_that_did_not_get_below_chance_are_never_evaluated(tmp_path, monkeypatch, ray_local, capsys):
    """Trials that 'completed' at a BPC not 0.1 bit below the unigram entropy (too few steps for the trainer's
    own check) are not a configuration worth evaluating: the same rule as the trainer's and the report's."""
    spec = study_file(tmp_path, "chance", FAMILIES.replace("lr: 0.02", "lr: 1.0e-7")
                      + "evaluate: {top_k: 1, per: family, seeds: [1]}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "evaluate: no search trial finished below chance" in line, line
    client, runs = runs_of(tmp_path, "chance")
    assert [r.data.tags["nlstm.status"] for r in kind(runs, "trial", "search")] == ["completed", "completed"]
    assert not kind(runs, "trial", "evaluate") and not kind(runs, "config", "evaluate")
    assert kind(runs, "study")[0].data.tags["nlstm.phase.evaluate"].startswith("failed: evaluate: no search trial")
    states = [t.state.name for f in ("nlstm-d2", "single-d1") for t in optuna.load_study(
        study_name=f"chance/{f}", storage=f"sqlite:///{tmp_path / 'studies/chance/optuna.db'}").trials]
    assert states == ["COMPLETE", "COMPLETE"]


def test_python_runs_the_cli(tmp_path):
    """The faults above drive the real CLI in a subprocess; this checks the command line they use exists."""
    out = subprocess.run([sys.executable, str(REPO / "study" / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=60, env=ENV)
    assert out.returncode == 0 and "--space" in out.stdout
