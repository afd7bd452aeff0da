"""Real studies on a local Ray with tiny data: the MLflow hierarchy, a diverging trial that fails
alone, ASHA-stopped trials told to Optuna as pruned, and a driver killed with SIGKILL then resumed."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

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


def test_a_study_records_the_mlflow_hierarchy(tmp_path, monkeypatch, ray_local, capsys):
    spec = study_file(tmp_path, "tiny", """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: random, seed: 0}
  scheduler: {type: none}
  num_samples: 2
evaluate: {top_k: 1, seeds: [1]}
ablation: {base: search, factors: {arch: [nlstm, single]}, seeds: [5]}
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    out = capsys.readouterr().out
    assert f"sqlite:///{tmp_path / 'mlflow.db'}" in out and str(tmp_path / "studies" / "tiny") in out

    client, runs = runs_of(tmp_path, "tiny")
    (parent,) = kind(runs, "study")
    tags = parent.data.tags
    assert tags["nlstm.study"] == "tiny" and len(tags["nlstm.study_hash"]) == 64
    assert all(tags[f"nlstm.phase.{p}"] == "done" for p in ("search", "evaluate", "ablation"))
    assert parent.data.params["metric"] == "valid_bpc" and parent.data.params["sampler"] == "random(seed=0)"
    assert parent.data.params["num_samples"] == "2" and len(parent.data.params["data_fingerprint"]) == 64
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"study.yaml", "spec.json", "environment.json"}
    env = json.loads(Path(client.download_artifacts(parent.info.run_id, "environment.json", str(tmp_path))).read_text())
    assert env["packages"]["torch"] and env["threads"]["torch_threads_per_trial"] == 1

    search = kind(runs, "trial", "search")
    assert sorted(r.data.tags["nlstm.trial_id"] for r in search) == ["search-0000", "search-0001"]
    assert {r.data.tags["nlstm.arch"] for r in search} == {"nlstm", "stacked"}  # balanced
    for r in search:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["nlstm.status"] == "completed" and r.info.status == "FINISHED"
        assert r.data.tags["nlstm.seed"] == "0" and r.data.tags["nlstm.family"].endswith("-d2")
        assert r.info.run_name == f"{r.data.tags['nlstm.trial_id']}-{r.data.tags['nlstm.family']}"
        p = r.data.params
        assert {"lr", "arch", "budget", "width", "embedding_dim", "num_params", "epochs", "seed", "bptt"} <= set(p)
        assert p["budget"] == "3000" and abs(int(p["num_params"]) - 3000) / 3000 < 0.05
        assert steps(client, r) == [1, 2] and steps(client, r, "tokens_seen") == [1, 2]
        assert {"best_valid_bpc", "num_params", "epochs_run", "train_bpc", "lr", "wall_time_s"} <= set(r.data.metrics)
        assert 0 <= r.data.metrics["closer_bpc"] < 10 and p["dependency_length"] == "10"  # the long-range probe

    (ev_config,) = kind(runs, "config", "evaluate")
    assert ev_config.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert ev_config.data.tags["nlstm.source_trial"] in ("search-0000", "search-0001")
    (ev_trial,) = kind(runs, "trial", "evaluate")
    assert ev_trial.data.tags["mlflow.parentRunId"] == ev_config.info.run_id
    assert ev_trial.data.tags["nlstm.seed"] == "1"
    family, config = ev_trial.data.tags["nlstm.family"], ev_trial.data.tags["nlstm.config_hash"]
    assert ev_trial.info.run_name == f"evaluate-{family}-s1-{config[:6]}"
    assert ev_trial.data.tags["nlstm.config_hash"] == ev_config.data.tags["nlstm.config_hash"]
    metrics = ev_trial.data.metrics
    assert {"test_bpc", "timescale_l0", "timescale_l1", "step_change_l0", "step_change_l1"} <= set(metrics)
    assert {a.path for a in client.list_artifacts(ev_trial.info.run_id)} == {"memories.npz", "model.pt"}

    ablation_configs = kind(runs, "config", "ablation")
    assert sorted(r.data.tags["nlstm.factor.arch"] for r in ablation_configs) == ["nlstm", "single"]
    for r in kind(runs, "trial", "ablation"):
        assert r.data.tags["mlflow.parentRunId"] in {c.info.run_id for c in ablation_configs}
        assert r.data.tags["nlstm.seed"] == "5" and r.data.tags["nlstm.status"] == "completed"
    best = json.loads((tmp_path / "studies" / "tiny" / "search_results.json").read_text())[0]
    assert (tmp_path / "studies" / "tiny" / "best" / f"{best['key']}.pt").is_file()

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
    assert "search-0000 failed: DivergenceError: training loss became nan" in out, out

    client, runs = runs_of(tmp_path, "diverge")
    by_id = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
    failed, ok = by_id["search-0000"], by_id["search-0001"]
    assert failed.info.status == "FAILED" and failed.data.tags["nlstm.status"] == "failed"
    assert failed.data.tags["nlstm.fail_reason"].startswith("diverged: training loss became nan")
    assert ok.data.tags["nlstm.status"] == "completed" and steps(client, ok) == [1, 2]
    assert kind(runs, "study")[0].data.tags["nlstm.phase.search"] == "done"
    rows = json.loads((tmp_path / "studies" / "diverge" / "search_results.json").read_text())
    assert [r["status"] for r in rows] == ["completed", "failed"]


def test_trials_stopped_by_asha_are_pruned_in_optuna(tmp_path, monkeypatch, ray_local):
    """Trial 0 learns; trials 1-3 (lr ~1e-6) are worse and ASHA stops them early. Ray's
    OptunaSearch would tell them COMPLETE with their early values; they must be PRUNED."""
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
    assert status["search-0000"] == "completed" and "pruned" in status.values(), status
    logged = {r.data.tags["nlstm.trial_id"]: steps(client, r) for r in kind(runs, "trial")}

    (state_file,) = (tmp_path / "studies" / "asha" / "ray" / "search").glob("searcher-state-*.pkl")
    with open(state_file, "rb") as f:
        searcher = pickle.load(f)
    trials = {f"search-{t.number:04d}": t for t in searcher["_ot_study"].get_trials(deepcopy=False)}
    assert set(trials) == set(status)
    for key, t in trials.items():
        if status[key] == "completed":
            assert t.state == optuna.trial.TrialState.COMPLETE and logged[key] == [1, 2, 3]
            assert sorted(t.intermediate_values) == [1, 2, 3]
            best = next(r for r in kind(runs, "trial") if r.data.tags["nlstm.trial_id"] == key)
            assert t.value == pytest.approx(best.data.metrics["best_valid_bpc"])
        else:  # stopped early: PRUNED, with every value it reported, the last one included
            assert t.state == optuna.trial.TrialState.PRUNED, (key, t)
            run = next(r for r in kind(runs, "trial") if r.data.tags["nlstm.trial_id"] == key)
            assert run.info.status == "FINISHED"  # not shown as a failure in MLflow's UI
            assert sorted(t.intermediate_values) == logged[key] and len(logged[key]) < 3
            assert t.intermediate_values[logged[key][-1]] > trials["search-0000"].value


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_a_killed_driver_resumes_without_rerunning_or_duplicating(tmp_path):
    spec = study_file(tmp_path, "resume", """\
train: {epochs: 3, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: none}
  num_samples: 3
  max_concurrent: 1
""").resolve()
    spec.write_text(spec.read_text().replace("train_chars: 4000", "train_chars: 16000"))  # epochs of ~1 s
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "study" / "run.py"), "--space", str(spec)]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    groups = [first.pid]
    try:
        client, before = None, {}
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:  # kill it once a trial has finished and the next one has begun
            time.sleep(0.5)
            if first.poll() is not None or not (tmp_path / "mlflow.db").exists():
                continue
            try:
                client, runs = runs_of(tmp_path, "resume")
            except Exception:
                continue
            trials = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
            done = [k for k, r in trials.items() if r.data.tags["nlstm.status"] == "completed"]
            if done and len(trials) > len(done) and any(steps(client, r) for k, r in trials.items() if k not in done):
                before = trials
                break
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert before, "the study never reached a state to interrupt"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        completed_before = {k: r for k, r in before.items() if r.data.tags["nlstm.status"] == "completed"}

        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
                                start_new_session=True)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "(resuming)" in second.stdout

        client, runs = runs_of(tmp_path, "resume")
        assert len(kind(runs, "study")) == 1 and kind(runs, "study")[0].data.tags["nlstm.phase.search"] == "done"
        trial_ids = [r.data.tags["nlstm.trial_id"] for r in kind(runs, "trial")]
        assert sorted(trial_ids) == [f"search-{i:04d}" for i in range(3)]  # no run twice, none lost
        after = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
        for key, run in after.items():
            assert run.data.tags["nlstm.status"] == "completed", key
            assert steps(client, run) == [1, 2, 3], key  # every epoch recorded once
        for key, run in completed_before.items():  # finished before the kill: same run, not retrained
            assert after[key].info.run_id == run.info.run_id
            assert after[key].data.metrics["best_valid_bpc"] == run.data.metrics["best_valid_bpc"]
            history = client.get_metric_history(run.info.run_id, "train_bpc")
            assert max(m.timestamp for m in history) <= run.info.end_time
    finally:
        if first.poll() is None:
            first.kill()
        first.wait(timeout=30)
        first.stdout.close()
        for pgid in groups:  # Ray agents that outlived the killed driver, if the rerun left any
            _kill_group(pgid)


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


def test_a_phase_saved_by_another_code_version_fails_in_one_line(tmp_path, monkeypatch, ray_local, capsys):
    """Tune pickles the search space and callbacks by module path: a phase folder written before
    a module moved cannot be restored. That is one line naming the folder and the way out."""
    from ray import tune

    from study import phases

    spec = study_file(tmp_path, "moved", """\
train: {epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
ablation: {factors: {arch: [single]}, seeds: [1]}
""")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, *a, **k: True))

    def old_pickle(*args, **kwargs):
        raise AttributeError("Can't get attribute 'CategoricalEntry' on <module 'study.spec'>")

    monkeypatch.setattr(phases.tune.Tuner, "restore", old_pickle)
    assert main(["--space", str(spec)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "ablation: the trial state in" in err[0] and "saved by another version of this code" in err[0]
    assert "AttributeError: Can't get attribute 'CategoricalEntry'" in err[0] and "--restart" in err[0]
