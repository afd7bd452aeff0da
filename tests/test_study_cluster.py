"""Studies on a real 2-node Ray cluster (issue 9), built on this machine by tests/cluster_harness.py:
its own network namespace with only loopback, an MLflow server, a Ray head without CPUs, a worker
node that cannot import the project (its folders hidden under an empty bind mount) and, for the
object store, an S3-compatible server (moto). Skipped where ``unshare`` is not permitted.

The fast tests at the end (no Ray) cover the pieces: refusals before anything is written, the
balanced architecture as an Optuna parameter, the Optuna study's binding to its record, the
storage binding, and the node-side corpus and device checks.
"""

from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from test_study_run import DATA, kind, steps

REPO = Path(__file__).resolve().parents[1]
ADDRESS, TRACKING = "127.0.0.1:6380", "http://127.0.0.1:5055"
S3_STORAGE = "s3://studies/runs?endpoint_override=127.0.0.1:5060&scheme=http"


def _namespaces_permitted() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = ["unshare", "-n", "-p", "-f", "--mount-proc", "unshare", "-m", "sh", "-c", "ip link set lo up"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_namespaces = pytest.mark.skipif(not _namespaces_permitted(),
                                      reason="needs unshare -n/-p/-m (root or user namespaces)")


def run_cluster(work: Path, name: str, body: str, plan: dict, *extra: str) -> dict:
    """Write the study file, run the harness in fresh network/PID namespaces, return its result."""
    spec = work / f"{name}.yaml"
    spec.write_text(f"name: {name}\n" + DATA + body)
    (work / "shared").mkdir()  # the "shared file system": the same path on every node
    plan = plan | {"args": ["--space", str(spec), "--address", ADDRESS, "--tracking-uri", TRACKING,
                            "--output", str(work / "driver" / "studies"), *extra]}
    command = ["unshare", "-n", "-p", "-f", "--mount-proc", sys.executable, str(REPO / "tests" / "cluster_harness.py"),
               str(work), json.dumps(plan)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    result = json.loads((work / "result.json").read_text()) if (work / "result.json").is_file() else {}
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(work.glob("*.log")))
    assert "error" not in result and out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:] + logs
    result["logs"] = {p.stem: p.read_text(errors="replace") for p in work.glob("*.log")}
    assert result["node_imports_project"] is False  # the worker node is a machine without the checkout
    assert len(result["head_nodes"]) == 1 and len(result["worker_nodes"]) == 1
    return result


def store(work: Path, name: str) -> tuple[MlflowClient, object, list]:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")  # the server's backend, read after it stopped
    exp = client.get_experiment_by_name(name)
    return client, exp, list(client.search_runs([exp.experiment_id], max_results=1000))


def artifacts(work: Path, exp, run) -> set[str]:
    """The files of a run in the server's artifact store (``--artifacts-destination``)."""
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location  # proxied by the server
    folder = work / "mlartifacts" / exp.experiment_id / run.info.run_id / "artifacts"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def optuna_trials(work: Path, name: str) -> dict[str, optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work / 'driver' / 'studies' / name / 'optuna.db'}")
    return {t.user_attrs["run_name"]: t for t in study.get_trials(deepcopy=False)}


@pytest.mark.slow
@needs_namespaces
def test_a_study_runs_on_a_two_node_cluster_with_a_shared_folder(tmp_path):
    """Token authentication as docs/study.md sets it up. Trials 2 and 3 (lr 1e-6) are worse than 0
    and ASHA stops them after one epoch. The Optuna study is a sqlite file in the driver's folder,
    which the worker node cannot see: only the driver writes it."""
    result = run_cluster(tmp_path, "cl", """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
    lr: {type: categorical, choices: [0.02, 1.0e-6], balanced: true}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
  num_samples: 4
  max_concurrent: 1
evaluate: {top_k: 1, seeds: [1]}
""", {"token": True}, "--storage", str(tmp_path / "shared"))
    assert result["drivers"] == [0] and result["token"], result["logs"]["driver1"][-3000:]
    (worker,) = result["worker_nodes"]

    client, exp, runs = store(tmp_path, "cl")
    (parent,) = kind(runs, "study")
    assert parent.data.tags["nlstm.phase.search"] == parent.data.tags["nlstm.phase.evaluate"] == "done"
    assert artifacts(tmp_path, exp, parent) == {"study.yaml", "spec.json", "environment.json"}
    search = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial", "search")}
    assert sorted(search) == ["nlstm-d2-search-000", "nlstm-d2-search-002", "stacked-d2-search-001",
                              "stacked-d2-search-003"]
    (config,) = kind(runs, "config", "evaluate")
    (evaluated,) = kind(runs, "trial", "evaluate")
    assert evaluated.data.tags["mlflow.parentRunId"] == config.info.run_id
    assert config.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert artifacts(tmp_path, exp, evaluated) == {"model.pt", "memories.npz"}
    for r in [*search.values(), evaluated]:  # every trial trained on the worker node
        tags = r.data.tags
        assert tags["nlstm.node_id"] == worker and tags["nlstm.node_ip"] == "127.0.0.1", tags
        assert tags["nlstm.hostname"] and tags["nlstm.device"] == "cpu" and tags["nlstm.threads"] == "1"
    status = {k: r.data.tags["nlstm.status"] for k, r in search.items()}
    assert status["nlstm-d2-search-000"] == "completed"
    assert status["nlstm-d2-search-002"] == status["stacked-d2-search-003"] == "pruned"

    trials = optuna_trials(tmp_path, "cl")  # the live Optuna study of the driver, not Ray's pickle
    assert set(trials) == set(search)
    for key, t in trials.items():
        assert t.params["arch"] == search[key].data.tags["nlstm.arch"]  # the architecture is Optuna's parameter
        assert float(t.params["lr"]) == float(search[key].data.params["lr"])
        wanted = optuna.trial.TrialState.COMPLETE if status[key] == "completed" else optuna.trial.TrialState.PRUNED
        assert t.state == wanted, (key, t.state, status[key])
    assert sorted(t.params["arch"] for t in trials.values()) == ["nlstm", "nlstm", "stacked", "stacked"]

    record = tmp_path / "shared" / "cl" / parent.info.run_id
    assert len(list((record / "ray").glob("run-*"))) == 1  # one Tune experiment for every phase
    assert (record / "checkpoints" / "nlstm-d2-search-000" / "trainer.pt").is_file()  # written by the worker
    assert json.loads((record / "record.json").read_text())["parent_run_id"] == parent.info.run_id
    study_dir = tmp_path / "driver" / "studies" / "cl"
    assert not (study_dir / "ray").exists() and not (study_dir / "checkpoints").exists()


@pytest.mark.slow
@needs_namespaces
def test_a_study_stores_its_trials_in_s3_and_resumes_from_there(tmp_path):
    """SIGTERM stops the driver mid-search; the rerun resumes the trials from the S3 storage."""
    result = run_cluster(tmp_path, "s3c", """\
train: {epochs: 3, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: tpe, seed: 0}
  scheduler: {type: none}
  num_samples: 2
evaluate: {top_k: 1, seeds: [1]}
""", {"s3": True, "sigterm_driver_at": 1}, "--storage", S3_STORAGE)
    assert result["drivers"] == [143, 0], result["logs"]["driver2"][-3000:]
    client, exp, runs = store(tmp_path, "s3c")
    (parent,) = kind(runs, "study")
    assert "(resuming)" in result["logs"]["driver2"]
    keys = set(result["s3_keys"])
    assert f"runs/s3c/{parent.info.run_id}/record.json" in keys
    assert any(k.startswith(f"runs/s3c/{parent.info.run_id}/checkpoints/") and k.endswith("trainer.pt") for k in keys)
    search = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial", "search")}
    assert sorted(search) == ["nlstm-d2-search-000", "stacked-d2-search-001"]
    for r in search.values():
        assert r.data.tags["nlstm.status"] == "completed" and steps(client, r) == [1, 2, 3]
        assert r.data.tags["nlstm.node_id"] == result["worker_nodes"][0]
    (evaluated,) = kind(runs, "trial", "evaluate")
    assert artifacts(tmp_path, exp, evaluated) == {"model.pt", "memories.npz"}
    trials = optuna_trials(tmp_path, "s3c")  # the rerun continued the same Optuna study
    assert sorted(trials) == sorted(search)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())
    (config,) = kind(runs, "config", "evaluate")
    source = search[config.data.tags["nlstm.source_trial"]]
    assert artifacts(tmp_path, exp, source) == {"model.pt"}  # read back from its checkpoint in S3


@pytest.mark.slow
@needs_namespaces
def test_a_worker_node_that_dies_mid_study_loses_only_its_running_epochs(tmp_path):
    """The raylet of the only worker node is killed while both trials train; a new worker node
    joins; the trials continue there from their checkpoints, into the same runs."""
    result = run_cluster(tmp_path, "lost", """\
train: {epochs: 4, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null}
search:
  space:
    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}
  scheduler: {type: none}
  num_samples: 2
""".replace("train_chars: 4000", "train_chars: 60000"), {"kill_worker_at": 1},
        "--storage", str(tmp_path / "shared"))
    assert result["drivers"] == [0], result["logs"]["driver1"][-3000:]
    (old,), (new,) = result["worker_nodes"], result["worker_nodes_after"]
    assert old != new
    client, exp, runs = store(tmp_path, "lost")
    trials = {r.data.tags["nlstm.trial_id"]: r for r in kind(runs, "trial")}
    assert sorted(trials) == ["nlstm-d2-search-000", "stacked-d2-search-001"]  # no run twice
    moved = 0
    for key, r in trials.items():
        assert r.data.tags["nlstm.status"] == "completed", key
        history = client.get_metric_history(r.info.run_id, "valid_bpc")
        assert sorted(m.step for m in history) == [1, 2, 3, 4], (key, history)  # every epoch logged once
        before_kill = [m for m in history if m.timestamp / 1000 < result["worker_killed_at"]]
        if before_kill and r.data.tags["nlstm.node_id"] == new:
            moved += 1  # trained on the dead node, finished on the new one, its early epochs kept
            # Ray's results of the trial: continued from its last checkpoint, no epoch trained twice
            (parent,) = kind(runs, "study")
            (results,) = (tmp_path / "shared" / "lost" / parent.info.run_id / "ray").glob(f"run-*/{key}/result.json")
            rows = results.read_text()
            epochs = [json.loads(line)["epoch"] for line in rows.splitlines() if line.strip()]
            assert epochs == sorted(set(epochs)) and epochs[-1] == 4, (key, epochs)
    assert moved >= 1, {k: r.data.tags for k, r in trials.items()}
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in optuna_trials(tmp_path, "lost").values())


# ------------------------------------------------------------------ fast: no Ray
class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_cluster():
    """A port that accepts connections (the --address probe) and an HTTP /health (the tracking probe)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("extra, message", [
    ([], "--address: the tracking store sqlite:///"),
    (["--tracking-uri", "http://{addr}"], "--address: Tune's trials and checkpoints need storage that every node "
                                          "can reach; pass --storage"),
    (["--tracking-uri", "http://{addr}", "--storage", "s3://nobucket/x?endpoint_override=127.0.0.1:1&scheme=http"],
     "--storage s3://nobucket/x?endpoint_override=127.0.0.1:1&scheme=http: cannot write there"),
    (["--tracking-uri", "http://{addr}", "--storage", "ftp://host/x"], "expected a folder or an object store URI"),
    (["--tracking-uri", "http://{addr}", "--storage", "{tmp}/missing"], "missing: no such folder"),
    (["--tracking-uri", "http://{addr}", "--storage", "{tmp}/shared", "--optuna-storage", "redis://x"],
     "--optuna-storage redis://x: unknown scheme 'redis'"),
])
def test_a_cluster_study_without_reachable_tracking_or_storage_is_refused_in_one_line(
        tmp_path, monkeypatch, capsys, fake_cluster, extra, message):
    from study.run import main

    spec = tmp_path / "c.yaml"
    spec.write_text("name: c\n" + DATA + "train: {epochs: 1}\nsearch: {space: {lr: {type: float, low: 0.001, "
                    "high: 0.01}}, num_samples: 1}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "shared").mkdir()
    extra = [a.format(addr=fake_cluster, tmp=tmp_path) for a in extra]
    assert main(["--space", str(spec), "--address", fake_cluster, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "shared"]  # nothing written
    assert not list((tmp_path / "shared").iterdir())


def _spec(tmp_path: Path, space: str, sampler: str = "{type: tpe, seed: 0, n_startup_trials: 2}"):
    from study.spec.load import load_spec

    path = tmp_path / "b.yaml"
    path.write_text("name: b\n" + DATA + f"search:\n  space:\n{space}  sampler: {sampler}\n  num_samples: 9\n")
    return load_spec(path)


@pytest.mark.parametrize("sampler", ["{type: tpe, seed: 0, n_startup_trials: 2}",
                                     "{type: tpe, seed: 0, n_startup_trials: 2, multivariate: true}",
                                     "{type: random, seed: 1}", "{type: grid, seed: 0}"])
def test_the_balanced_architecture_is_an_optuna_parameter_allocated_in_turn(tmp_path, sampler):
    """Before: `arch` was returned as a constant, so Optuna's trials had only {lr}."""
    from study.search.space import DefineByRun, make_sampler

    depth = "" if "grid" in sampler else \
        "    depth: {type: categorical, choices: [2, 3], when: {arch: [nlstm, stacked]}}\n"  # grid: no conditions
    space = ("    arch: {type: categorical, choices: [nlstm, stacked, single], balanced: true}\n" + depth +
             "    lr: {type: categorical, choices: [0.01, 0.02, 0.03]}\n")
    spec = _spec(tmp_path, space, sampler)
    study = optuna.create_study(sampler=make_sampler(spec), direction="minimize")
    define = DefineByRun(spec)
    archs, trials = [], 3 if "grid" in sampler else 9  # the grid (3 lr values) is exhausted after 3
    for n in range(trials):
        trial = study.ask()
        constants = define(trial)
        assert constants == {"trial_number": n} and trial.number == n
        assert set(trial.params) >= {"arch", "lr"}
        assert ("depth" in trial.params) == (bool(depth) and trial.params["arch"] != "single")
        archs.append(trial.params["arch"])
        if n < trials - 1:
            study.tell(trial, float(n % 4))
    assert archs == ["nlstm", "stacked", "single"] * (trials // 3)
    assert isinstance(study.trials[0].distributions["arch"], optuna.distributions.CategoricalDistribution)


def test_two_balanced_entries_take_the_digits_of_the_trial_number(tmp_path):
    from study.search.space import preview_search

    spec = _spec(tmp_path, "    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}\n"
                           "    lr: {type: categorical, choices: [0.02, 1.0e-6], balanced: true}\n")
    assert [(p["arch"], p["lr"]) for p in preview_search(spec, 4)] == [
        ("nlstm", 0.02), ("stacked", 0.02), ("nlstm", 1.0e-6), ("stacked", 1.0e-6)]


def test_the_optuna_study_belongs_to_one_record(tmp_path):
    from study.search.optuna_store import OptunaStoreError, prepare_studies, resolve_optuna_url

    url = resolve_optuna_url(None, tmp_path)
    assert url == f"sqlite:///{tmp_path / 'optuna.db'}"
    prepare_studies(url, ["s"], "run-1", {})
    study = optuna.load_study(study_name="s", storage=url)  # what optuna-dashboard opens
    assert study.metric_names == ["valid_bpc"]
    study.tell(study.ask(), 1.0)
    prepare_studies(url, ["s"], "run-1", {"s": 1})  # the same record resumes the same study
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1
    with pytest.raises(OptunaStoreError, match="of another MLflow record .*run-1, not run-2"):
        prepare_studies(url, ["s"], "run-2", {})
    with pytest.raises(OptunaStoreError, match="has no study 't', but the MLflow record has 3 of its search trials"):
        prepare_studies(url, ["t"], "run-1", {"t": 3})  # a storage that lost what the record has
    prepare_studies(url, ["s"], "run-2", {}, restart=True)
    again = optuna.load_study(study_name="s", storage=url)
    assert again.trials == [] and again.user_attrs["nlstm.parent_run_id"] == "run-2"
    journal = resolve_optuna_url(str(tmp_path / "j.log"), tmp_path)
    prepare_studies(journal, ["s"], "run-3", {})
    assert optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(journal))).user_attrs["nlstm.parent_run_id"] == "run-3"
    with pytest.raises(OptunaStoreError, match="expected an RDB URL"):
        resolve_optuna_url("optuna.db", tmp_path)


def test_the_storage_is_part_of_the_record_binding(tmp_path):
    from study.driver.cluster import ClusterError, Storage, bind_storage, resolve_storage
    from study.record.folder import RecordBinding, claim_cache

    study_dir = tmp_path / "studies" / "s"
    local = RecordBinding("sqlite:////x/mlflow.db", "1", "run", "hash", str(study_dir / "ray"))
    assert claim_cache(study_dir, local) is None
    (study_dir / "ray").mkdir()
    # record.json of a study run before the storage was recorded: its storage was the default
    legacy = json.loads((study_dir / "record.json").read_text())
    del legacy["storage"]
    (study_dir / "record.json").write_text(json.dumps(legacy))
    assert claim_cache(study_dir, local) is None and (study_dir / "ray").is_dir()
    moved = RecordBinding(**(local.as_dict() | {"storage": "s3://bucket/x/s/run"}))
    note = claim_cache(study_dir, moved)
    assert note and "Ray storage s3://bucket/x/s/run" in note and not (study_dir / "ray").exists()

    (tmp_path / "shared").mkdir()
    storage = resolve_storage(str(tmp_path / "shared"), "127.0.0.1:1", study_dir).join("s", "run")
    assert isinstance(storage, Storage) and storage.location == f"{tmp_path}/shared/s/run"
    bind_storage(storage, moved.as_dict())
    bind_storage(storage, moved.as_dict())  # the same record: fine
    with pytest.raises(ClusterError, match="holds the Ray trials of another record"):
        bind_storage(storage, local.as_dict())


def test_a_node_without_the_drivers_corpus_or_gpu_is_named(tmp_path, monkeypatch):
    from nlstm.data import CorpusError
    from study.spec.load import load_spec
    from study.trials.corpus import load_study_corpus, node_corpus
    from study.trials.placement import trial_device

    path = tmp_path / "d.yaml"
    path.write_text("name: d\n" + DATA + "ablation: {factors: {arch: [nlstm]}, seeds: [1]}\n")
    spec = load_spec(path)
    where = {"nlstm.hostname": "gpu-3", "nlstm.node_ip": "10.0.0.13", "nlstm.node_id": "1a2b3c4d5e6f"}
    fingerprint = load_study_corpus(spec, None).fingerprint
    # the driver's --data-dir is not mounted on the node: the node's own data (here generated) is used
    assert node_corpus(spec, str(tmp_path / "not-on-this-node"), fingerprint, where).fingerprint == fingerprint
    with pytest.raises(CorpusError, match=r"node gpu-3 \(10.0.0.13, node 1a2b3c4d\): its synthetic corpus .* "
                                          r"differs from the driver's"):
        node_corpus(spec, None, "0" * 64, where)
    def absent(*args, **kwargs):
        raise CorpusError("ptb.train.txt is not in /data or the cache, and the download failed")

    monkeypatch.setattr("study.trials.corpus.load_study_corpus", absent)
    with pytest.raises(CorpusError, match=r"node gpu-3 \(10.0.0.13, node 1a2b3c4d\): corpus 'synthetic' not "
                                          r"available there \(ptb.train.txt is not in"):
        node_corpus(spec, None, fingerprint, where)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="node gpu-3 .*asked for a GPU but torch sees no CUDA device"):
            trial_device("cuda", where)
    assert trial_device("cpu", where) == "cpu"
