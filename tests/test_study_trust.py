"""The study's record can be trusted (issue 8): one record per Ray cache, honest exit codes, one
driver per study (a lease in the store), a sqlite store created whole, fast one-line failures,
SIGTERM handled like Ctrl+C, cleanup of only the driver's own processes, bounded retries."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_study_run import REPO, kind, optuna_trials, runs_of, steps, study_file

from study.record.store import StoreError, open_client, resolve_tracking_uri
from study.run import main

SEARCH = """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: random, seed: 0}
  scheduler: {type: none}
  num_samples: 2
"""
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def driver(spec: Path, cwd: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "study" / "run.py"), "--space", str(spec), *args], cwd=cwd,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its private Ray, if anything outlived it
        except (ProcessLookupError, PermissionError):
            pass
    return process.returncode, out, err


def sigterm_once_trials_logged(process: subprocess.Popen, tmp_path: Path, study: str,
                               trials: int) -> tuple[int, str, str]:
    """SIGTERM the driver once ``trials`` trial runs have logged an epoch; its exit code and output."""
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if not (tmp_path / "mlflow.db").exists():  # a reader must not create the store the driver creates
                continue
            try:
                client, runs = runs_of(tmp_path, study)
            except Exception:
                continue
            if len([r for r in kind(runs, "trial") if steps(client, r)]) >= trials:
                break
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        return finish(process, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()


# ------------------------------------------------------------------ item 1: one record
def test_a_ray_cache_from_another_store_is_set_aside_not_reused(tmp_path, monkeypatch, ray_local, capsys):
    spec = study_file(tmp_path, "rec", SEARCH)
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec), "--tracking-uri", str(tmp_path / "a.db")]) == 0
    # The same output folder, a new store and a new lr range: nothing of the old search may leak in.
    spec.write_text(spec.read_text().replace("low: 3.0e-3, high: 3.0e-2", "low: 1.0e-3, high: 2.0e-3"))
    capsys.readouterr()
    assert main(["--space", str(spec), "--tracking-uri", str(tmp_path / "b.db")]) == 0
    out = capsys.readouterr().out
    assert "set aside in" in out and "starting cleanly" in out, out
    assert "resuming" not in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'b.db'}")
    exp = client.get_experiment_by_name("rec")
    trials = kind(list(client.search_runs([exp.experiment_id])), "trial", "search")
    assert len(trials) == 2 and all(1.0e-3 <= float(r.data.params["lr"]) <= 2.0e-3 for r in trials)
    assert all(r.data.tags["nlstm.status"] == "completed" for r in trials)
    assert list((tmp_path / "studies" / "rec" / "set-aside").glob("*/checkpoints/nlstm-d2-search-000"))


# ------------------------------------------------------------------ items 2 and 12: honest exit, bounded retries
def test_a_phase_whose_trials_all_failed_is_a_failure_and_transient_failures_are_retried(
        tmp_path, monkeypatch, ray_local, capsys):
    spec = study_file(tmp_path, "allfail", """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, optimizer: sgd, clip: 0, patience: null}
search:
  space:
    lr: {type: categorical, choices: [1.0e+30, 2.0e+30], balanced: true}
  scheduler: {type: none}
  num_samples: 2
evaluate: {top_k: 1, seeds: [1]}
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: search: no trial of 2 completed (2 failed") and \
        "commonest failure (2x): diverged: training loss became nan" in err[0], err
    assert "a rerun would fail the same way" in err[0]
    client, runs = runs_of(tmp_path, "allfail")
    (parent,) = kind(runs, "study")
    assert parent.info.status == "FAILED" and parent.data.tags["nlstm.phase.search"].startswith("failed: ")
    assert "nlstm.phase.evaluate" not in parent.data.tags and not kind(runs, "trial", "evaluate")

    assert [t.state.name for t in optuna_trials(tmp_path, "allfail")] == ["FAIL", "FAIL"]  # final: not rerun


def test_a_failure_that_is_not_a_divergence_is_retried_then_given_up(tmp_path, monkeypatch, ray_local, capsys):
    """Trial 1's batch does not fit its data (a ValueError, not a divergence): Tune restarts it and the trial
    counts its attempts on its run, then gives up after MAX_ATTEMPTS; the search goes on with the other."""
    spec = study_file(tmp_path, "retry", """\
train: {epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, patience: null}
search:
  space:
    batch_size: {type: categorical, choices: [8, 100000], balanced: true}
  scheduler: {type: none}
  num_samples: 2
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    runs = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs_of(tmp_path, "retry")[1], "trial")}
    assert sorted(runs) == ["nlstm-d2-search-000", "nlstm-d2-search-001"]
    gave_up = runs["nlstm-d2-search-001"]
    assert gave_up.data.tags["nlstm.attempts"] == "3"
    assert gave_up.data.tags["nlstm.fail_reason"].startswith("gave up after 3 attempts; the last failed with "
                                                              "ValueError: "), gave_up.data.tags
    assert [t.state.name for t in optuna_trials(tmp_path, "retry")] == ["COMPLETE", "FAIL"]
    assert main(["--space", str(spec)]) == 0  # the rerun does not try it a fourth time
    again = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs_of(tmp_path, "retry")[1], "trial")}
    assert again["nlstm-d2-search-001"].data.tags["nlstm.attempts"] == "3"


# ------------------------------------------------------------------ items 3 and 4: two drivers, one store
def test_two_drivers_of_one_study_on_a_fresh_store_one_runs_the_other_is_refused(tmp_path):
    spec = study_file(tmp_path, "twice", SEARCH).resolve()
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = driver(spec, tmp_path / "one", "--tracking-uri", store)
    second = driver(spec, tmp_path / "two", "--tracking-uri", store)
    results = [finish(first), finish(second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    (_, _, refused_err), = [r for r in results if r[0] == 1]
    lines = refused_err.strip().splitlines()
    assert len(lines) == 1 and ("is already running" in lines[0] or "at the same moment" in lines[0]), lines
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("twice")
    runs = list(client.search_runs([exp.experiment_id]))
    assert len(kind(runs, "study")) == 1
    trials = kind(runs, "trial")
    assert sorted(r.data.tags["nlstm.trial_id"] for r in trials) == ["nlstm-d2-search-000", "stacked-d2-search-001"]
    for r in trials:
        assert steps(client, r) == [1, 2] and steps(client, r, "train_bpc") == [1, 2]  # each epoch once
    assert "nlstm.lease" not in client.get_experiment(exp.experiment_id).tags  # released


def _open(uri: str, barrier: multiprocessing.Barrier) -> str:
    barrier.wait()
    try:
        open_client(uri).search_experiments()
        return "ok"
    except Exception as e:  # reported to the test, not raised in the pool
        return f"{type(e).__name__}: {e}"


def test_a_fresh_sqlite_store_opened_by_four_processes_at_once_is_created_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            outcomes = pool.starmap(_open, [(uri, barrier)] * 4)
    assert outcomes == ["ok"] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["fresh.db"]  # no staging file left behind


def test_the_lease_of_a_live_driver_refuses_and_a_dead_ones_is_taken_over(tmp_path):
    from study.record.lease import LeaseHeld, StudyLease

    client = open_client(f"sqlite:///{tmp_path / 'l.db'}")
    exp = client.create_experiment("s")
    first = StudyLease(client, exp, "s", settle_s=0.05, heartbeat_s=0.2)
    assert first.acquire() is None
    with pytest.raises(LeaseHeld, match="already running .*driver pid"):
        StudyLease(client, exp, "s", settle_s=0.05).acquire()
    first._stop.set()  # the first driver dies without releasing (no more heartbeats)
    first._thread.join()
    stale = StudyLease(client, exp, "s", settle_s=0.05, stale_after_s=0.0)
    assert "taking over" in stale.acquire()
    stale.release()
    assert "nlstm.lease" not in client.get_experiment(exp).tags


def test_a_lease_taken_over_and_released_meanwhile_is_lost_not_taken_back(tmp_path):
    """A paused driver resumed after another driver took its study over and finished (deleting the lease):
    its heartbeat must not write the free lease back as its own, or its fenced writes would pass."""
    import threading

    from study.record.lease import LeaseLost, StudyLease

    client = open_client(f"sqlite:///{tmp_path / 'l.db'}")
    exp = client.create_experiment("s")
    lost = threading.Event()
    first = StudyLease(client, exp, "s", settle_s=0.05, heartbeat_s=0.1, on_lost=lambda why: lost.set())
    first.acquire()
    client.delete_experiment_tag(exp, "nlstm.lease")  # the other driver's release, after it took over
    assert lost.wait(10) and first.lost
    assert "nlstm.lease" not in client.get_experiment(exp).tags  # not written back
    with pytest.raises(LeaseLost, match="another driver took over"):
        first.check()
    first.release()


# ------------------------------------------------------------------ item 10: fast, clear failures
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "notaurl"], "is neither a URI"),
    (["--tracking-uri", "ftp://x/y"], "unknown scheme 'ftp'"),
    (["--tracking-uri", "http://127.0.0.1:1"], "tracking server http://127.0.0.1:1 cannot be reached"),
    (["--tracking-uri", "/nonexistent-folder/mlflow.db"], "folder /nonexistent-folder does not exist"),
    (["--tracking-uri", "postgresql://user:secret@127.0.0.1:1/db"], "tracking store postgresql://user:***@127.0.0.1:1/db"),
    (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray cluster answers there"),
    (["--address", "nonsense"], "expected auto or HOST:PORT"),
])
def test_bad_stores_and_addresses_fail_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                               args, message):
    spec = study_file(tmp_path, "bad", SEARCH)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--space", str(spec), *args]) == 2
    line = _one_line_error(capsys)
    assert message in line and "secret" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no notaurl, no mlflow.db, no studies/


@pytest.mark.parametrize("args", [["--max-concurrent", "-1"], ["--max-concurrent", "0"], ["--cpus-per-trial", "0"],
                                  ["--gpus-per-trial", "-0.5"], ["--cpus-per-trial", "nan"]])
def test_numeric_arguments_are_range_checked_before_anything_is_written(tmp_path, monkeypatch, capsys, args):
    spec = study_file(tmp_path, "bad", SEARCH)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--space", str(spec), *args])
    assert exit_info.value.code == 2 and f"argument {args[0]}: expected a number" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_mlflow_tracking_uri_is_the_default_store(tmp_path, monkeypatch):
    from dashboards.load import default_tracking_uri  # the report's and the UI's default

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5055"
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5055"
    assert resolve_tracking_uri("x.db", tmp_path) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(StoreError):
        resolve_tracking_uri("mlflow", tmp_path)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_a_read_only_store_folder_is_one_line(tmp_path):
    spec = study_file(tmp_path, "ro", SEARCH)
    folder = tmp_path / "ro"
    folder.mkdir()
    script = (f"mount -t tmpfs -o ro none {folder} && exec {sys.executable} {REPO / 'study' / 'run.py'} "
              f"--space {spec} --tracking-uri {folder / 'mlflow.db'}")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m is not permitted here: {probe.stderr.decode().strip()}")
    out = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"folder {folder} is not writable" in lines[0], lines


# ------------------------------------------------------------------ item 10: SIGTERM
def test_sigterm_stops_the_study_cleanly_and_a_rerun_resumes_it(tmp_path):
    spec = study_file(tmp_path, "term", SEARCH.replace("epochs: 2", "epochs: 3").replace(
        "num_samples: 2", "num_samples: 3\n  max_concurrent: 1")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 16000"))
    code, _, err = sigterm_once_trials_logged(driver(spec, tmp_path), tmp_path, "term", trials=1)
    assert code == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err, err
    client, runs = runs_of(tmp_path, "term")
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert kind(runs, "study")[0].info.status == "KILLED"

    code, out, err = finish(driver(spec, tmp_path))
    assert code == 0, out + err
    assert "(resuming)" in out
    client, runs = runs_of(tmp_path, "term")
    trials = kind(runs, "trial")
    assert sorted(r.data.tags["nlstm.trial_id"] for r in trials) == ["nlstm-d2-search-000", "nlstm-d2-search-002",
                                                                     "stacked-d2-search-001"]
    assert all(r.data.tags["nlstm.status"] == "completed" and steps(client, r) == [1, 2, 3] for r in trials)


def test_sigterm_while_every_trial_runs_is_an_interruption_not_a_failed_phase(tmp_path):
    """Tune marks the trials it stops on SIGINT TERMINATED, like finished ones: with no trial
    pending, counting ended trials took the interruption for a phase whose trials were all
    stopped early, or, with one trial finished, for a phase done with the other one pruned (exit 0)."""
    spec = study_file(tmp_path, "allrun", SEARCH.replace("epochs: 2", "epochs: 4")).resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 60000"))  # epochs of seconds
    code, out, err = sigterm_once_trials_logged(driver(spec, tmp_path), tmp_path, "allrun", trials=2)
    assert code == 143 and "interrupted (SIGTERM)" in err, out + err
    code, out, err = finish(driver(spec, tmp_path))
    assert code == 0 and "(resuming)" in out, out + err
    client, runs = runs_of(tmp_path, "allrun")
    assert all(r.data.tags["nlstm.status"] == "completed" and steps(client, r) == [1, 2, 3, 4]
               for r in kind(runs, "trial"))


# ------------------------------------------------------------------ item 12: only its own processes
def test_leftover_cleanup_kills_only_the_recorded_processes_of_a_dead_driver(tmp_path):
    from study.driver.processes import DriverRecord, process_start_time

    # A "driver" that starts one child and dies; a bystander in the same process group whose
    # command line looks like Ray's (what the old /proc scan would have killed).
    script = "import subprocess, sys; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"
    dead = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    orphan = int(dead.stdout.readline())
    dead.wait()
    dead.stdout.close()
    bystander = subprocess.Popen(["bash", "-c", "exec -a /tmp/ray/session_latest/raylet sleep 60"])
    try:
        record = tmp_path / "driver.json"
        record.write_text(f'{{"pid": {dead.pid}, "start": 1, '
                          f'"children": [[{orphan}, {process_start_time(orphan)}], '
                          f'[{bystander.pid}, {(process_start_time(bystander.pid) or 0) + 1}]]}}')
        assert DriverRecord(record).stop_leftovers() == 1
        time.sleep(0.2)
        assert process_start_time(orphan) is None or Path(f"/proc/{orphan}/stat").read_text().split()[2] == "Z"
        assert bystander.poll() is None  # same pid, other start time: not ours
    finally:
        bystander.kill()
        try:
            os.kill(orphan, signal.SIGKILL)
        except ProcessLookupError:
            pass
