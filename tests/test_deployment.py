"""docs/study.md's team deployment, built for real (issue 19): an MLflow tracking server on
PostgreSQL with its artifacts in an S3-compatible server (moto), the Optuna studies in the same
PostgreSQL, a 2-node Ray cluster, and two users' studies run at once against all of it. Everything
listens on 127.0.0.1 inside a network namespace (tests/cluster_harness.py). Skipped where
PostgreSQL 15 or the namespaces are missing.

The PostgreSQL roles have passwords, and the password must stay out of everything the study
prints and records: the drivers' output, the MLflow runs (params, tags, artifacts such as
environment.json), the Optuna studies' attributes, the drivers' folders and the MLflow artifacts
in the bucket. The fast tests at the end check ``study.record.redact.mask_url`` against SQLAlchemy's own
password masking and the one-line refusals that quote a URL.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cluster_harness import PG_PORT, S3_PORT, TRACKING, postgres_missing
from test_study_cluster import needs_namespaces
from test_study_run import DATA

from study.record.redact import mask_url

REPO = Path(__file__).resolve().parents[1]
ADDRESS = "127.0.0.1:6380"
RAY_STORAGE = f"s3://studies/ray?endpoint_override=127.0.0.1:{S3_PORT}&scheme=http"
MLFLOW_ARTIFACTS = "s3://studies/mlflow"
OPTUNA_DB = f"127.0.0.1:{PG_PORT}/optuna"
STUDIES = {  # user -> (study name, what it searches)
    "alice": ("alice-lr", "    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}\n"),
    "bob": ("bob-arch", "    arch: {type: categorical, choices: [nlstm, stacked], balanced: true}\n"),
}
needs_postgres = pytest.mark.skipif(postgres_missing() is not None, reason=str(postgres_missing()))


def study_file(folder: Path, name: str, space: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + DATA + "train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, "
                    "lr: 0.01, patience: null}\nsearch:\n  space:\n" + space +
                    "  sampler: {type: tpe, seed: 0}\n  scheduler: {type: none}\n  num_samples: 2\n"
                    "  max_concurrent: 1\n")
    return path


def files_containing(folder: Path, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
@needs_namespaces
@needs_postgres
def test_two_users_run_studies_at_once_on_a_team_deployment(tmp_path):
    """Alice puts the password in her --optuna-storage URL (the tool masks it wherever it prints or
    records the URL); Bob keeps it in his ~/.pgpass, as docs/study.md advises, and so does the MLflow
    server with PGPASSWORD. Both studies finish; each has its runs in MLflow and its trials in
    Optuna's PostgreSQL storage; neither password is anywhere in what they printed or recorded."""
    optuna_pw, mlflow_pw = f"opt-{secrets.token_hex(8)}", f"mlf-{secrets.token_hex(8)}"
    alice_url = f"postgresql://optuna:{optuna_pw}@{OPTUNA_DB}"
    urls = {"alice": alice_url, "bob": f"postgresql://optuna@{OPTUNA_DB}"}
    bob_home = tmp_path / "home" / "bob"
    bob_home.mkdir(parents=True)
    (bob_home / ".pgpass").write_text(f"127.0.0.1:{PG_PORT}:optuna:optuna:{optuna_pw}\n")
    (bob_home / ".pgpass").chmod(0o600)  # libpq ignores a .pgpass that others can read
    env = {"alice": {}, "bob": {"HOME": str(bob_home)}}
    drivers, names = [], [name for name, _ in STUDIES.values()]
    for user, (name, space) in STUDIES.items():
        spec = study_file(tmp_path, name, space)
        drivers.append({"name": user, "env": env[user], "args": [
            "--space", str(spec), "--address", ADDRESS, "--tracking-uri", TRACKING, "--storage", RAY_STORAGE,
            "--optuna-storage", urls[user], "--output", str(tmp_path / "driver" / user / "studies")]})
    plan = {"postgres": {"mlflow": mlflow_pw, "optuna": optuna_pw}, "s3": True,
            "mlflow_backend": f"postgresql://mlflow@127.0.0.1:{PG_PORT}/mlflow",
            "mlflow_env": {"PGPASSWORD": mlflow_pw},
            "mlflow_artifacts": MLFLOW_ARTIFACTS, "drivers": drivers, "timeout": 420,
            "records": {"experiments": names, "optuna": alice_url},
            "find_in_s3": [optuna_pw, mlflow_pw, *names]}
    command = ["unshare", "-n", "-p", "-f", "--mount-proc", sys.executable, str(REPO / "tests" / "cluster_harness.py"),
               str(tmp_path), json.dumps(plan)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=900)
    (tmp_path / "harness.txt").write_text(out.stdout + out.stderr)  # its timeline, for a failure's reader
    result = json.loads((tmp_path / "result.json").read_text()) if (tmp_path / "result.json").is_file() else {}
    logs = {p.stem: p.read_text(errors="replace") for p in tmp_path.glob("*.log")}
    shown = out.stdout[-3000:] + out.stderr[-3000:] + "".join(f"\n--- {k}\n{v[-2500:]}" for k, v in logs.items())
    assert "error" not in result and out.returncode == 0, shown
    assert result["drivers"] == [0, 0], shown
    assert result["node_imports_project"] is False and len(result["worker_nodes"]) == 1

    records = result["records"]
    windows = []
    for user, (name, _) in STUDIES.items():
        exp = records["mlflow"][name]
        assert exp["artifact_location"].startswith("mlflow-artifacts:"), exp  # proxied by the server into S3
        (parent,) = [r for r in exp["runs"] if r["tags"].get("nlstm.kind") == "study"]
        trials = {r["tags"]["nlstm.trial_id"]: r for r in exp["runs"] if r["tags"].get("nlstm.kind") == "trial"}
        expected = {"alice": ["nlstm-d2-search-000", "nlstm-d2-search-001"],
                    "bob": ["nlstm-d2-search-000", "stacked-d2-search-001"]}[user]
        assert sorted(trials) == expected and exp["search_runs_rows"] == 3, exp
        assert parent["status"] == "FINISHED" and parent["tags"]["nlstm.phase.search"] == "done"
        for r in trials.values():
            assert r["status"] == "FINISHED" and r["tags"]["nlstm.status"] == "completed"
            assert "valid_bpc" in r["metrics"]
            assert r["tags"]["nlstm.node_id"] == result["worker_nodes"][0]  # trained on the worker node
        environment = json.loads(parent["artifacts"]["environment.json"])
        assert environment["optuna_storage"] == mask_url(urls[user])
        assert mask_url(urls[user]) in environment["command"]  # the command line, as given but masked
        assert f"mlflow/{exp['experiment_id']}/{parent['run_id']}/artifacts/environment.json" in result["s3_keys"]
        windows.append((parent["start_time"], parent["end_time"]))

        study = records["optuna"][name]  # the Optuna study in PostgreSQL, bound to its MLflow record
        assert study["user_attrs"]["nlstm.parent_run_id"] == parent["run_id"]
        assert [(t["number"], t["state"]) for t in study["trials"]] == [(0, "COMPLETE"), (1, "COMPLETE")]
        for t in study["trials"]:
            (run,) = [r for key, r in trials.items() if key.endswith(f"-search-{t['number']:03d}")]
            for key, value in t["params"].items():
                got = run["tags"]["nlstm.arch"] if key == "arch" else run["params"][key]
                assert str(value) == got or float(value) == float(got), (key, value, got)
        assert f"  Optuna:  {mask_url(urls[user])}  (a study per search family" in logs[user], logs[user][-2000:]
    assert max(start for start, _ in windows) < min(end for _, end in windows)  # the two studies overlapped

    # Each study's Tune folder in the bucket holds its own experiment only: one experiment state
    # (one driver, no resume), and no searcher state naming the other study. (Ray stages a driver's
    # Tune files in <Ray session dir>/artifacts/<start second>/<experiment name>/ and syncs that
    # folder to --storage: two drivers of one cluster on one machine starting experiments of the
    # same name in the same second share it.)
    found = result["found_in_s3"]
    for name in names:
        folder = [k for k in result["s3_keys"] if k.startswith(f"ray/{name}/")]
        assert len([k for k in folder if "/experiment_state-" in k]) == 1, folder
        strangers = {k: found[k] for k in folder if set(found.get(k, [])) & (set(names) - {name})}
        assert strangers == {}, f"another study's Tune files in {name}'s folder: {strangers}"

    # The passwords are nowhere the users or the records can see.
    for secret in (optuna_pw, mlflow_pw):
        for user in STUDIES:
            assert secret not in logs[user], f"{user}'s driver printed a password"
        assert secret not in json.dumps(records), "a password is in the MLflow or Optuna records"
        assert files_containing(tmp_path / "driver", secret) == []
    # In the bucket: nothing. The study's searcher and callbacks are never pickled with the Optuna storage
    # (Tune snapshots them, nothing reads them back), so not even Alice's URL reaches Tune's files.
    leaks = {key: hits for key, hits in found.items() if set(hits) & {optuna_pw, mlflow_pw}}
    assert leaks == {}, leaks


# ------------------------------------------------------------------ fast: mask_url
@pytest.mark.parametrize("url", [
    "postgresql://optuna:s3cr3t@db.lab:5432/optuna",
    "postgresql+psycopg2://optuna:p%40ss@127.0.0.1/optuna?sslmode=require",
    "mysql+pymysql://root:pa:ss@127.0.0.1:3306/x",
    "postgresql://optuna@db.lab/optuna",
    "sqlite:////abs/optuna.db",
])
def test_mask_url_hides_what_sqlalchemy_hides(url):
    """SQLAlchemy's own rendering with hide_password=True is the independent reference."""
    from sqlalchemy.engine import make_url

    assert mask_url(url) == make_url(url).render_as_string(hide_password=True)


@pytest.mark.parametrize("text, masked", [
    ("--optuna-storage=postgresql://u:pw@h:5432/db", "--optuna-storage=postgresql://u:***@h:5432/db"),
    ("postgresql://u@h/db?sslmode=require&password=pw", "postgresql://u@h/db?sslmode=require&password=***"),
    ("s3://bucket/x?endpoint_override=h:9000&scheme=http&secret_key=pw", "s3://bucket/x?endpoint_override=h:9000"
                                                                          "&scheme=http&secret_key=***"),
    ("s3://AKIA:pw@bucket/x", "s3://AKIA:***@bucket/x"),
    ("error: --optuna-storage: postgresql://u:pw@h/db holds a study",
     "error: --optuna-storage: postgresql://u:***@h/db holds a study"),
    ("http://127.0.0.1:5055", "http://127.0.0.1:5055"),
    ("s3://studies/ray?endpoint_override=127.0.0.1:5060&scheme=http",
     "s3://studies/ray?endpoint_override=127.0.0.1:5060&scheme=http"),
    ("/shared/studies", "/shared/studies"),
])
def test_mask_url_masks_passwords_inside_arguments_and_messages(text, masked):
    assert mask_url(text) == masked


@pytest.mark.parametrize("args, shown", [
    (["--optuna-storage", "redis://u:pw-3141@127.0.0.1:6379/0"], "--optuna-storage redis://u:***@127.0.0.1:6379/0: "
                                                                 "unknown scheme 'redis'"),
    (["--tracking-uri", "http://u:pw-3141@127.0.0.1:1"], "tracking server http://u:***@127.0.0.1:1 cannot be reached"),
    (["--tracking-uri", "ftp://u:pw-3141@x/y"], "tracking URI 'ftp://u:***@x/y': unknown scheme 'ftp'"),
])
def test_a_refused_url_is_quoted_without_its_password(tmp_path, monkeypatch, capsys, args, shown):
    from study.run import main

    spec = study_file(tmp_path, "m", STUDIES["alice"][1])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["--space", str(spec), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shown in err[0] and "pw-3141" not in err[0], err


def test_environment_json_and_the_summary_show_the_urls_masked(tmp_path, monkeypatch, capsys):
    """environment.json (the parent run's artifact) and the summary at the end, from a real
    ``prepare`` of a command line with a password in --optuna-storage (no database is reached)."""
    from study.run import _environment, _print_done, build_parser, prepare

    url = "postgresql://optuna:pw-2718@127.0.0.1:1/optuna"
    argv = ["--space", str(study_file(tmp_path, "m", STUDIES["alice"][1])), f"--optuna-storage={url}"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", ["study/run.py", *argv])
    args = build_parser().parse_args(argv)
    setup = prepare(args)
    assert setup.optuna_url == url  # the driver itself connects with the real URL
    environment = _environment(args, setup)
    assert environment["optuna_storage"] == "postgresql://optuna:***@127.0.0.1:1/optuna"
    assert environment["command"] == ["study/run.py", argv[0], argv[1], f"--optuna-storage={mask_url(url)}"]
    assert "pw-2718" not in json.dumps(environment, default=str)
    run = SimpleNamespace(checkpoints=SimpleNamespace(location=str(setup.study_dir / "checkpoints")),
                          storage=setup.storage)
    _print_done(args, setup, run, 61.0, None)
    out = capsys.readouterr().out
    assert "  Optuna:  postgresql://optuna:***@127.0.0.1:1/optuna  (a study per search family" in out, out
    assert "pw-2718" not in out, out
