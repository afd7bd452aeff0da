"""Real studies on a local Ray with tiny data: the MLflow hierarchy, a diverging trial that fails
alone, ASHA-stopped trials told to Optuna as pruned, and a driver killed with SIGKILL then resumed."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from study.driver.processes import descendants
from study.run import main

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DATA = """\
data:
  corpus: synthetic
  options: {seed: 0, train_chars: 4000, valid_chars: 600, test_chars: 600, dependency_length: 10}
model: {embedding_dim: 8}
budget: 3000
"""


def study_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + DATA + body)
    return path


def runs_of(tmp_path: Path, name: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    return client, list(client.search_runs([exp.experiment_id], max_results=1000))


def kind(runs: list, k: str, phase: str | None = None) -> list:
    return [r for r in runs if r.data.tags.get("nlstm.kind") == k
            and (phase is None or r.data.tags.get("nlstm.phase") == phase)]


def steps(client: MlflowClient, run, metric: str = "valid_bpc") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))


def optuna_trials(tmp_path: Path, study: str) -> list:
    storage = f"sqlite:///{tmp_path / 'studies' / study.split('/')[0] / 'optuna.db'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def test_a_study_records_the_mlflow_hierarchy(tmp_path, monkeypatch, ray_local, capsys):
    spec = study_file(tmp_path, "tiny", """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  families: [{arch: nlstm, depth: 2}, {arch: stacked, layers: 2}]
  trials_per_family: 1
  space:
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: random, seed: 0}
  scheduler: {type: none}
evaluate: {top_k: 1, seeds: [1]}
ablation: {base: search, factors: {arch: [nlstm, single]}, seeds: [5]}
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    out = capsys.readouterr().out
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in out and str(tmp_path / "studies" / "tiny") in out
    assert "study efficiency" in out

    client, runs = runs_of(tmp_path, "tiny")
    (parent,) = kind(runs, "study")
    tags = parent.data.tags
    assert tags["nlstm.study"] == "tiny" and len(tags["nlstm.study_hash"]) == 64
    assert all(tags[f"nlstm.phase.{p}"] == "done" for p in ("search", "evaluate", "ablation"))
    assert tags["nlstm.record_version"] == "2" and tags["nlstm.code_version"].startswith("0.2.0")
    assert tags["nlstm.search_trials_per_family"] == "1" and tags["nlstm.search_trials"] == "2"
    assert tags["nlstm.search_fidelity"] == "2 epochs of 25 steps; scheduler none"
    assert parent.data.params["metric"] == "valid_bpc" and parent.data.params["sampler"] == "random(seed=0)"
    assert len(parent.data.params["data_fingerprint"]) == 64
    assert 0 < parent.data.metrics["study_efficiency"] <= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"study.yaml", "spec.json", "environment.json"}
    env = json.loads(Path(client.download_artifacts(parent.info.run_id, "environment.json", str(tmp_path))).read_text())
    assert env["packages"]["torch"] and env["threads"]["torch_threads_per_trial"] == 1

    search = kind(runs, "trial", "search")
    assert sorted(r.data.tags["nlstm.trial_id"] for r in search) == ["nlstm-d2-search-000", "stacked-d2-search-000"]
    for r in search:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["nlstm.status"] == "completed" and r.info.status == "FINISHED"
        assert r.data.tags["nlstm.stop_reason"] == "max_epochs"
        assert r.data.tags["nlstm.seed"] == "0" and r.info.run_name == r.data.tags["nlstm.trial_id"]
        assert r.data.tags["nlstm.code_version"] == tags["nlstm.code_version"]
        assert r.data.tags["nlstm.candidate_activation"] in ("identity", "tanh")
        assert json.loads(r.data.tags["nlstm.params"])["lr"] == pytest.approx(float(r.data.params["lr"]))
        p = r.data.params
        assert {"lr", "arch", "budget", "width", "embedding_dim", "num_params", "epochs", "seed", "bptt"} <= set(p)
        assert p["budget"] == "3000" and abs(int(p["num_params"]) - 3000) / 3000 < 0.05
        assert steps(client, r) == [1, 2] and steps(client, r, "tokens_seen") == [1, 2]
        assert steps(client, r, "cpu_share") == [1, 2] and steps(client, r, "load_avg_1m") == [1, 2]
        assert {"best_valid_bpc", "num_params", "epochs_run", "train_bpc", "lr", "wall_time_s",
                "load_avg_max"} <= set(r.data.metrics)
        assert 0 <= r.data.metrics["closer_bpc"] < 10 and p["dependency_length"] == "10"  # the long-range probe
    # each family's own Optuna study, its objective named, its trials linked to their runs
    for family, run in (("nlstm-d2", "nlstm-d2-search-000"), ("stacked-d2", "stacked-d2-search-000")):
        (trial,) = optuna_trials(tmp_path, f"tiny/{family}")
        record = next(r for r in search if r.data.tags["nlstm.trial_id"] == run)
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.value == pytest.approx(record.data.metrics["best_valid_bpc"])
        assert trial.user_attrs["mlflow_run_id"] == record.info.run_id and trial.user_attrs["run_name"] == run
        assert trial.user_attrs["family"] == family and trial.user_attrs["stop_reason"] == "max_epochs"
        assert trial.user_attrs["num_params"] == int(record.data.metrics["num_params"])
    study = optuna.load_study(study_name="tiny/nlstm-d2", storage=f"sqlite:///{tmp_path / 'studies/tiny/optuna.db'}")
    assert study.metric_names == ["valid_bpc"]

    (ev_config,) = kind(runs, "config", "evaluate")
    assert ev_config.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ev_config.data.tags["nlstm.source_trial"] in ("nlstm-d2-search-000", "stacked-d2-search-000")
    assert ev_config.data.tags["nlstm.selected"] == "true"
    (ev_trial,) = kind(runs, "trial", "evaluate")
    assert ev_trial.data.tags["mlflow.parentRunId"] == ev_config.info.run_id
    assert ev_trial.data.tags["nlstm.seed"] == "1"
    family, config = ev_trial.data.tags["nlstm.family"], ev_trial.data.tags["nlstm.config_hash"]
    assert ev_trial.info.run_name == f"{family}-s1-evaluate-{config[:8]}"
    assert ev_trial.data.tags["nlstm.config_hash"] == ev_config.data.tags["nlstm.config_hash"]
    metrics = ev_trial.data.metrics
    assert {"test_bpc", "timescale_l0", "timescale_l1", "step_change_l0", "step_change_l1"} <= set(metrics)
    assert {a.path for a in client.list_artifacts(ev_trial.info.run_id)} == {"memories.npz", "model.pt"}
    # summary metrics where MLflow's collapsed table shows them: the config run's and the study's best
    assert ev_config.data.metrics["valid_bpc_mean"] == pytest.approx(metrics["best_valid_bpc"])
    assert ev_config.data.metrics["n_seeds"] == 1 and "valid_bpc_sd" not in ev_config.data.metrics
    assert parent.data.metrics["valid_bpc_mean"] == ev_config.data.metrics["valid_bpc_mean"]
    assert parent.data.tags["nlstm.best_config"] == ev_config.info.run_name
    source = next(r for r in search if r.data.tags["nlstm.trial_id"] == ev_config.data.tags["nlstm.source_trial"])
    assert {a.path for a in client.list_artifacts(source.info.run_id)} == {"model.pt"}  # the chosen search trial's

    ablation_configs = kind(runs, "config", "ablation")
    assert sorted(r.data.tags["nlstm.factor.arch"] for r in ablation_configs) == ["nlstm", "single"]
    for r in kind(runs, "trial", "ablation"):
        assert r.data.tags["mlflow.parentRunId"] in {c.info.run_id for c in ablation_configs}
        assert r.data.tags["nlstm.seed"] == "5" and r.data.tags["nlstm.status"] == "completed"

    # a finished study leaves no run RUNNING in MLflow's table: the study, its config runs, its trials
    assert {r.info.run_name: r.info.status for r in runs if r.info.status != "FINISHED"} == {}

    # Running it again finds every phase done and adds no run.
    assert main(["--space", str(spec)]) == 0
    assert len(runs_of(tmp_path, "tiny")[1]) == len(runs)


def test_a_diverging_trial_fails_alone(tmp_path, monkeypatch, ray_local, capsys):
    spec = study_file(tmp_path, "diverge", """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, optimizer: sgd, clip: 0, patience: null}
search:
  space:
    lr: {type: categorical, choices: [1.0e+30, 0.5], balanced: true}   # trial 0 overflows to NaN
  scheduler: {type: none}
  num_samples: 2
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "nlstm-d2-search-000 failed: DivergenceError: training loss became nan" in out, out

    client, runs = runs_of(tmp_path, "diverge")
    by_id = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
    failed, ok = by_id["nlstm-d2-search-000"], by_id["nlstm-d2-search-001"]
    assert failed.info.status == "FAILED" and failed.data.tags["nlstm.status"] == "failed"
    assert failed.data.tags["nlstm.fail_reason"].startswith("diverged: training loss became nan")
    assert failed.data.tags["nlstm.stop_reason"] == "diverged"
    assert ok.data.tags["nlstm.status"] == "completed" and steps(client, ok) == [1, 2]
    assert kind(runs, "study")[0].data.tags["nlstm.phase.search"] == "done"
    states = [t.state.name for t in optuna_trials(tmp_path, "diverge")]
    assert states == ["FAIL", "COMPLETE"]  # a divergence is final: told FAIL, not run again


def test_trials_stopped_by_asha_are_pruned_in_optuna(tmp_path, monkeypatch, ray_local):
    """Trial 0 learns; trials 1-3 (lr ~1e-6) are worse and ASHA stops them early. They must be PRUNED in
    Optuna with every value they reported (Ray's OptunaSearch would tell them COMPLETE), pruned in MLflow."""
    spec = study_file(tmp_path, "asha", """\
train: {epochs: 3, batch_size: 8, bptt: 20, eval_batch_size: 8, patience: null}
search:
  space:
    lr: {type: categorical, choices: [0.02, 1.0e-6, 2.0e-6, 3.0e-6], balanced: true}
    dropout: {type: float, low: 0.0, high: 0.1}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
  num_samples: 4
  max_concurrent: 1
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0

    client, runs = runs_of(tmp_path, "asha")
    status = {r.data.tags["nlstm.trial_id"]: r.data.tags["nlstm.status"] for r in kind(runs, "trial")}
    assert status["nlstm-d2-search-000"] == "completed" and "pruned" in status.values(), status
    logged = {r.data.tags["nlstm.trial_id"]: steps(client, r) for r in kind(runs, "trial")}
    trials = {t.user_attrs["run_name"]: t for t in optuna_trials(tmp_path, "asha")}
    assert set(trials) == set(status)
    for key, t in trials.items():
        run = next(r for r in kind(runs, "trial") if r.data.tags["nlstm.trial_id"] == key)
        if status[key] == "completed":
            assert t.state == optuna.trial.TrialState.COMPLETE and logged[key] == [1, 2, 3]
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.value == pytest.approx(run.data.metrics["best_valid_bpc"])
        else:  # stopped early: PRUNED, with every value it reported, the last one included
            assert t.state == optuna.trial.TrialState.PRUNED, (key, t)
            assert run.info.status == "FINISHED" and run.data.tags["nlstm.stop_reason"] == "pruned"
            assert t.user_attrs["stop_reason"] == "pruned"
            assert sorted(t.intermediate_values) == logged[key] and len(logged[key]) < 3
            assert t.intermediate_values[logged[key][-1]] > trials["nlstm-d2-search-000"].value


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(tmp_path: Path, study: str, ready, timeout_s: float = 600):
    """Poll the store until ``ready(client, runs)`` is true; the runs then. Generous: on a machine shared with
    other work the drivers run at a fraction of their speed (a wait, never a timed assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not (tmp_path / "mlflow.db").exists():
            continue
        try:
            client, runs = runs_of(tmp_path, study)
            if ready(client, runs):
                return runs
        except Exception:
            continue
    raise AssertionError("the study never reached the state to interrupt")


def test_killed_in_search_and_in_evaluate_with_rays_folder_deleted_and_rerun_elsewhere(tmp_path):
    """The record is the truth: SIGKILL during the search, Ray's folder deleted, rerun; SIGKILL during
    evaluate, rerun from another folder. Every trial ends once, every epoch is logged once, interrupted
    trials continue from their checkpoints, and the search keeps exactly its trials."""
    spec = study_file(tmp_path, "resume", """\
train: {epochs: 3, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  families: [{arch: nlstm, depth: 2}, {arch: stacked, layers: 2}]
  trials_per_family: 2
  space:
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: none}
  max_concurrent: 1
evaluate: {top_k: 1, per: family, seeds: [1, 2]}
""").resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 16000"))  # epochs of ~1 s
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, str(REPO / "study" / "run.py"), "--space", str(spec), "--tracking-uri", store,
               "--max-concurrent", "1"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    groups = []

    def midway(phase):
        def ready(client, runs):
            trials = [r for r in kind(runs, "trial", phase)]
            done = [r for r in trials if r.data.tags["nlstm.status"] == "completed"]
            return done and any(steps(client, r) for r in trials if r not in done)
        return ready

    try:
        first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        groups.append(first.pid)
        before = _wait_until(tmp_path, "resume", midway("search"))
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        shutil.rmtree(tmp_path / "studies" / "resume" / "ray")  # Ray's cache: disposable
        completed_before = {r.data.tags["nlstm.trial_id"]: r for r in kind(before, "trial")
                            if r.data.tags["nlstm.status"] == "completed"}

        second = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        groups.append(second.pid)
        _wait_until(tmp_path, "resume", midway("evaluate"))
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=30)
        second.stdout.close()

        third = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
                               start_new_session=True)
        assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
        assert "(resuming)" in third.stdout

        client, runs = runs_of(tmp_path, "resume")
        assert len(kind(runs, "study")) == 1
        search_ids = sorted(r.data.tags["nlstm.trial_id"] for r in kind(runs, "trial", "search"))
        assert search_ids == ["nlstm-d2-search-000", "nlstm-d2-search-001", "stacked-d2-search-000",
                              "stacked-d2-search-001"]  # none run twice, none lost
        assert len(kind(runs, "trial", "evaluate")) == 4 and len(kind(runs, "config", "evaluate")) == 2
        for run in kind(runs, "trial"):
            assert run.data.tags["nlstm.status"] == "completed", run.info.run_name
            assert steps(client, run) == [1, 2, 3], run.info.run_name  # every epoch recorded once
        for key, run in completed_before.items():  # finished before the kill: same run, not retrained
            after = next(r for r in kind(runs, "trial") if r.data.tags["nlstm.trial_id"] == key)
            assert after.info.run_id == run.info.run_id
            assert after.data.metrics["best_valid_bpc"] == run.data.metrics["best_valid_bpc"]
        for family in ("nlstm-d2", "stacked-d2"):  # exactly the trials the file asks for, all told
            states = [t.state.name for t in optuna_trials(tmp_path, f"resume/{family}")]
            assert states == ["COMPLETE", "COMPLETE"], (family, states)
        assert not (elsewhere / "studies" / "resume" / "checkpoints").exists()  # the record's checkpoints were used
    finally:
        for pgid in groups:  # Ray agents that outlived the killed drivers, if the reruns left any
            _kill_group(pgid)


def test_a_lost_record_json_and_a_lost_checkpoint_lose_nothing_and_mix_no_trainings(tmp_path):
    """Killed mid-search, then ``record.json`` emptied and the unfinished trial's checkpoint deleted: the
    folder is still provably this record's (its Optuna storage names the study run), so the search
    continues in it; the trial whose epochs were logged without a checkpoint starts over in a fresh run and
    its first run is kept, marked superseded, never continued with another training's epochs."""
    spec = study_file(tmp_path, "lost", """\
train: {epochs: 3, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  families: [{arch: nlstm, depth: 2}]
  trials_per_family: 2
  space:
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: none}
  max_concurrent: 1
""").resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 32000"))  # epochs of ~2 s
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "study" / "run.py"), "--space", str(spec), "--max-concurrent", "1"]
    study_dir = tmp_path / "studies" / "lost"

    def midway(client, runs):
        return [r for r in kind(runs, "trial") if r.data.tags["nlstm.status"] != "completed" and steps(client, r)]

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        _wait_until(tmp_path, "lost", midway)
        tree = descendants(first.pid)  # its Ray and the trial process: all killed, so none writes afterwards
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        for pid, _ in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        _kill_group(first.pid)
    time.sleep(1)
    client, runs = runs_of(tmp_path, "lost")
    (cut,) = midway(client, runs)
    key, logged = cut.data.tags["nlstm.trial_id"], steps(client, cut)
    (study_dir / "record.json").write_text("")
    shutil.rmtree(study_dir / "checkpoints" / key)

    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "record.json was missing or damaged" in rerun.stdout and not (study_dir / "set-aside").exists()
    assert json.loads((study_dir / "record.json").read_text())["parent_run_id"] == cut.data.tags["mlflow.parentRunId"]

    client, runs = runs_of(tmp_path, "lost")
    trials = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
    assert sorted(k for k in trials if "superseded" not in k) == ["nlstm-d2-search-000", "nlstm-d2-search-001"]
    for k in ("nlstm-d2-search-000", "nlstm-d2-search-001"):
        assert trials[k].data.tags["nlstm.status"] == "completed" and steps(client, trials[k]) == [1, 2, 3]
    (old,) = [r for k, r in trials.items() if k.startswith(f"{key}-superseded-")]
    assert old.info.run_id == cut.info.run_id and old.info.status == "FAILED"
    assert old.data.tags["nlstm.fail_reason"].startswith("superseded: its checkpoint could not be used")
    assert steps(client, old) == logged  # kept as it was: nothing recorded is lost
    assert trials[key].info.run_id != cut.info.run_id
    states = [t.state.name for t in optuna_trials(tmp_path, "lost/nlstm-d2")]
    assert states == ["COMPLETE", "COMPLETE"]


def test_a_data_factor_trains_each_trial_on_its_own_corpus(tmp_path, monkeypatch, ray_local):
    """The long-range study's shape: dependency_length as an ablation factor. Each cell generates its
    corpus (checked against the driver's fingerprint) and logs closer_bpc beside the overall BPC."""
    from nlstm.data import load_corpus

    spec = study_file(tmp_path, "reach", """\
train: {epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
ablation: {factors: {dependency_length: [4, 30], arch: [nlstm]}, seeds: [1]}
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    _, runs = runs_of(tmp_path, "reach")
    trials = kind(runs, "trial", "ablation")
    by_length = {int(r.data.params["dependency_length"]): r for r in trials}
    assert sorted(by_length) == [4, 30] and len(trials) == 2
    base = {"seed": 0, "train_chars": 4000, "valid_chars": 600, "test_chars": 600}
    for length, r in by_length.items():
        assert r.data.params["data_fingerprint"] == load_corpus("synthetic", dependency_length=length,
                                                                **base).fingerprint
        assert r.data.tags["nlstm.status"] == "completed"
        assert 0 <= r.data.metrics["closer_bpc"] < 10 and r.data.metrics["closer_bound_bits"] == 2.0
    assert len({r.data.tags["nlstm.config_hash"] for r in trials}) == 2
    factors = sorted(r.data.tags["nlstm.factor.dependency_length"] for r in kind(runs, "config", "ablation"))
    assert factors == ["30", "4"]


def test_a_crafted_ray_pickle_in_the_study_folder_runs_no_code(tmp_path, monkeypatch, ray_local):
    """Ray's folder is a cache the driver never reads back: a crafted tuner.pkl / searcher state in an
    unfinished study's ray/ folder is never unpickled (its payload would write a marker file)."""
    spec = study_file(tmp_path, "crafted", """\
train: {epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
ablation: {factors: {arch: [single]}, seeds: [1, 2]}
""")
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    assert main(["--space", str(spec), "--phases", "ablation"]) == 0
    client, runs = runs_of(tmp_path, "crafted")
    victim = kind(runs, "trial")[0]
    client.set_tag(victim.info.run_id, "nlstm.status", "interrupted")  # the study looks unfinished again
    for folder in ("ablation", "search", *(p.name for p in (tmp_path / "studies/crafted/ray").iterdir())):
        target = tmp_path / "studies" / "crafted" / "ray" / folder
        target.mkdir(parents=True, exist_ok=True)
        for name in ("tuner.pkl", "searcher-state-2026.pkl", "experiment_state-2026.json"):
            (target / name).write_bytes(pickle.dumps(Payload()))
    assert main(["--space", str(spec)]) == 0
    assert not marker.exists()
