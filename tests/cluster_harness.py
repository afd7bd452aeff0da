"""A real 2-node Ray cluster on this machine, for tests/test_study_cluster.py.

Run inside its own network and PID namespaces (``unshare -n -p -f --mount-proc``), so that only
loopback exists, Ray's nodes listen on 127.0.0.1 only, and nothing it starts outlives it::

    unshare -n -p -f --mount-proc python tests/cluster_harness.py WORK_DIR PLAN_JSON

It starts, each by PID: an MLflow server (sqlite backend and artifact store in WORK_DIR), an
optional S3-compatible server (moto), a Ray head with no CPUs (no trial can run there), and a
worker node with 2 CPUs inside its own mount namespace where the project's folders (the main
checkout's and this one's) and the driver's output folder are hidden under an empty bind mount:
a machine with the same Python environment that never saw the checkout. Then it runs the study
driver as the plan says (optionally killing the worker node's raylet mid-study and starting a
new worker node, or stopping the driver with SIGTERM and running it again), writes
WORK_DIR/result.json, and stops everything by PID. The test reads the MLflow store, the artifact
store and the Optuna storage from WORK_DIR afterwards.

For tests/test_deployment.py it builds docs/study.md's team deployment instead: a PostgreSQL
server (run as the ``postgres`` user in a temporary folder) with a password-protected role and a
database for MLflow and one for Optuna, an MLflow server on that PostgreSQL with its artifacts in
the S3-compatible server, and several drivers ("users") started at once. While the servers still
run it reads back, through MLflow's and Optuna's APIs, what they recorded (``result["records"]``),
and names the objects of the S3 bucket that contain any of the plan's strings (passwords, study names).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from study.driver.processes import descendants

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_PORT, RAY_PORT, S3_PORT, PG_PORT = 5055, 6380, 5060, 5433
PG_BIN = Path("/usr/lib/postgresql/15/bin")
TRACKING = f"http://127.0.0.1:{MLFLOW_PORT}"
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
RAY_ADDRESS = f"127.0.0.1:{RAY_PORT}"
HIDDEN_PACKAGES = ("nlstm", "study", "dashboards")
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
OBJECT_STORE_MEMORY = str(80 * 1024 * 1024)


def log(text: str) -> None:
    print(f"[harness {time.strftime('%H:%M:%S')}] {text}", flush=True)


AUTH: dict[str, str] = {"RAY_AUTH_MODE": "disabled"}  # token authentication once make_token() ran


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI",
                                                            "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return env | {"PYTHONUNBUFFERED": "1"} | AUTH | S3_ENV


def make_token(home: Path) -> None:
    """docs/study.md's order: `ray get-auth-token --generate` first (it writes ~/.ray/auth_token;
    HOME is a folder of the test), then every Ray process runs with RAY_AUTH_MODE=token and the token."""
    home.mkdir(exist_ok=True)
    out = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=base_env() | {"HOME": str(home)},
                         capture_output=True, text=True, timeout=60, check=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    assert token and token in out.stdout, out.stdout
    AUTH.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})


def wait_for(what: str, check, timeout: float = 120.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def postgres_missing() -> str | None:
    """Why this machine cannot run the PostgreSQL of the deployment test (None if it can)."""
    if not (PG_BIN / "initdb").is_file():
        return f"PostgreSQL 15 is not installed ({PG_BIN}/initdb)"
    if shutil.which("runuser") is None:
        return "runuser is missing (PostgreSQL refuses to run as root)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user to run PostgreSQL as"
    return None


class Cluster:
    def __init__(self, work: Path, plan: dict) -> None:
        self.work, self.plan = work, plan
        self.processes: dict[str, subprocess.Popen] = {}
        self.pg: Path | None = None  # PostgreSQL's folder (owned by the postgres user), once started
        self.worker_starts = 0
        self.empty = work / "empty"
        self.empty.mkdir(exist_ok=True)
        (work / "driver").mkdir(exist_ok=True)  # hidden from the worker node: a mount point must exist
        self.temp = Path(os.environ.get("TMPDIR", "/tmp")) / f"ray-{os.getpid()}-{os.urandom(3).hex()}"

    # ---------------------------------------------------------------- processes
    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
        out = open(self.work / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(command, env=env, cwd=cwd or self.work, stdout=out, stderr=subprocess.STDOUT)
        self.processes[name] = p
        log(f"started {name} (pid {p.pid})")
        return p

    def stop(self, name: str, timeout: float = 20.0) -> None:
        p = self.processes.get(name)
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
        log(f"stopped {name} (pid {p.pid}, rc {p.returncode})")

    def mlflow(self, wait: bool = True) -> None:
        """The tracking server; the plan may give its backend (a PostgreSQL URL), its environment and
        its artifact destination (an s3:// URI: the server reaches the S3 server through MLFLOW_S3_ENDPOINT_URL)."""
        env = base_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_S3_ENDPOINT_URL": S3_ENDPOINT}
        env |= self.plan.get("mlflow_env", {})  # e.g. PGPASSWORD for a backend URL without the password
        backend = self.plan.get("mlflow_backend") or f"sqlite:///{self.work / 'mlflow.db'}"
        artifacts = self.plan.get("mlflow_artifacts") or str(self.work / "mlartifacts")
        self.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
                              artifacts, "--host", "127.0.0.1", "--port", str(MLFLOW_PORT), "--workers", "1"], env)
        if wait:
            self.wait_mlflow()

    def wait_mlflow(self) -> None:
        wait_for("mlflow server", lambda: http_ok(f"{TRACKING}/health"))

    def as_postgres(self, *command: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
        out = subprocess.run(["runuser", "-u", "postgres", "--", *command], input=stdin, capture_output=True,
                             text=True, timeout=120, cwd=self.pg, env=env)
        if out.returncode:
            raise RuntimeError(f"{Path(command[0]).name} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
        return out.stdout

    def postgres(self) -> None:
        """docs/study.md's PostgreSQL: one server; the administrator (``admin``, trusted on the Unix
        socket only) makes a role with a password and a database of its own for each of the plan's
        ``{role: password}``; TCP logins need the password (scram-sha-256)."""
        roles = self.plan["postgres"]
        self.pg = Path(tempfile.mkdtemp(prefix="nlstm-pg-"))
        shutil.chown(self.pg, "postgres")
        data, socket_dir = self.pg / "data", str(self.pg)
        self.as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "admin", "--auth-local=trust",
                         "--auth-host=scram-sha-256")
        self.as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", f"-h 127.0.0.1 -p {PG_PORT} -k {socket_dir}",
                         "-l", str(self.pg / "server.log"), "-w", "start")
        log(f"started postgres on 127.0.0.1:{PG_PORT}")
        admin = ["-h", socket_dir, "-p", str(PG_PORT), "-U", "admin"]
        for role, password in roles.items():
            self.as_postgres(str(PG_BIN / "psql"), *admin, "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                             "-v", f"role={role}", "-v", f"password={password}",
                             stdin="CREATE ROLE :\"role\" LOGIN PASSWORD :'password';\n")
            self.as_postgres(str(PG_BIN / "createdb"), *admin, "--owner", role, role)

    def optuna_tables(self) -> None:
        """docs/study.md's step: Optuna's tables created once, before any driver (Optuna creates them
        on first use, and two drivers doing so at once on an empty PostgreSQL database collide). The
        password in the environment (libpq reads it), not on a command line."""
        code = f"import optuna; optuna.storages.RDBStorage('postgresql://optuna@127.0.0.1:{PG_PORT}/optuna')"
        env = base_env() | {"PGPASSWORD": self.plan["postgres"]["optuna"]}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=self.empty, capture_output=True, text=True,
                             timeout=120)
        if out.returncode:
            raise RuntimeError(f"creating Optuna's tables failed: {out.stderr.strip()[-2000:]}")

    def stop_postgres(self) -> None:
        if self.pg is None:
            return
        try:
            self.as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.pg / "data"), "-m", "fast", "-w", "stop")
            log("stopped postgres")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log(f"postgres: {e}")  # it dies with the PID namespace anyway
        if (self.pg / "server.log").is_file():
            shutil.copyfile(self.pg / "server.log", self.work / "postgres.log")
        shutil.rmtree(self.pg, ignore_errors=True)

    def s3(self) -> None:
        self.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)], base_env())
        wait_for("S3 server", lambda: http_ok(f"{S3_ENDPOINT}/moto-api/"))
        s3_client().create_bucket(Bucket="studies")

    def head(self, wait: bool = True) -> None:
        self.start("head", [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0", "--port", str(RAY_PORT),
                            "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(self.temp),
                            "--object-store-memory", OBJECT_STORE_MEMORY], base_env())
        if wait:
            self.wait_head()

    def wait_head(self) -> None:
        wait_for("ray head", lambda: self.alive_nodes() is not None, timeout=90, every=2)

    def hidden(self) -> list[Path]:
        """The folders a machine without the checkout lacks: the project's packages of the main
        checkout (the editable install's finder points there) and of this checkout, and the
        driver's output folder (only the driver writes optuna.db, record.json, best/)."""
        folders = [Path("/work/main") / p for p in HIDDEN_PACKAGES] + [REPO / p for p in HIDDEN_PACKAGES]
        return [f for f in dict.fromkeys(folders) if f.is_dir()] + [self.work / "driver"]

    def in_node_namespace(self, command: list[str]) -> list[str]:
        mounts = " && ".join(f"mount --bind {self.empty} {f}" for f in self.hidden())
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh", *command]

    def node_can_import_project(self) -> bool:
        probe = self.in_node_namespace([sys.executable, "-c", "import study.trials.trainable"])
        return subprocess.run(probe, env=base_env(), cwd=self.empty, capture_output=True).returncode == 0

    def worker(self) -> list[str]:
        """Start a worker node; returns the id of the node that joined."""
        self.worker_starts += 1
        name = f"worker{self.worker_starts}"
        env = base_env() | {"NLSTM_CACHE_DIR": str(self.work / "node-cache")}
        env.pop("NLSTM_DATA_DIR", None)
        before = {n["NodeID"] for n in self.alive_nodes() or []}
        self.start(name, self.in_node_namespace([
            str(BIN / "ray"), "start", "--address", RAY_ADDRESS, "--block", "--num-cpus", "2",
            "--disable-usage-stats", "--temp-dir", str(self.temp), "--object-store-memory", OBJECT_STORE_MEMORY]),
            env, cwd=self.empty)
        joined = wait_for(f"{name} to join", lambda: [n for n in self.alive_nodes() or [] if n["NodeID"] not in before
                                                       and n["Resources"].get("CPU")], timeout=120, every=2)
        return [n["NodeID"] for n in joined]

    def raylet_of(self, name: str) -> int:
        """The raylet started by worker node ``name`` (a child of its `ray start --block`)."""
        root = self.processes[name].pid
        children: dict[int, list[int]] = {}
        comm: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            pid = int(entry.name)
            comm[pid] = stat[stat.index("(") + 1:stat.rindex(")")]
            children.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(pid)
        todo = [root]
        while todo:
            pid = todo.pop()
            if comm.get(pid) == "raylet":
                return pid
            todo += children.get(pid, [])
        raise RuntimeError(f"no raylet under {name} (pid {root})")

    def alive_nodes(self) -> list[dict] | None:
        code = (f"import json, ray; ray.init(address={RAY_ADDRESS!r}, logging_level='ERROR', log_to_driver=False); "
                "print('NODES' + json.dumps([n for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], env=base_env(), cwd=self.empty, capture_output=True,
                             text=True, timeout=60)
        for line in out.stdout.splitlines():
            if line.startswith("NODES"):
                return json.loads(line[5:])
        return None

    # ---------------------------------------------------------------- the driver
    def driver(self, args: list[str], name: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        env = base_env() | {"PYTHONPATH": str(REPO)} | (env or {})
        cwd = cwd or self.work / "driver"
        cwd.mkdir(parents=True, exist_ok=True)
        return self.start(name, [sys.executable, str(REPO / "study" / "run.py"), *args], env, cwd=cwd)

    def users(self) -> list[int]:
        """The plan's drivers (``{"name", "args", "env"}``), each in its own folder under driver/,
        started together: several users sharing the servers and the cluster. Their exit codes."""
        started = [self.driver(d["args"], d["name"], d.get("env"), cwd=self.work / "driver" / d["name"])
                   for d in self.plan["drivers"]]
        deadline = time.monotonic() + self.plan.get("timeout", 300)
        for p in started:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"driver pid {p.pid} still running at the timeout")
        return [p.returncode for p in started]

    def epochs_logged(self) -> int:
        try:
            with sqlite3.connect(f"file:{self.work / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
                return db.execute("select count(*) from metrics where key = 'valid_bpc'").fetchone()[0]
        except sqlite3.Error:
            return 0

    def run(self) -> dict:
        plan, result = self.plan, {"drivers": []}
        if plan.get("token"):  # before any Ray process starts
            make_token(self.work / "home")
            result["token"] = True
        if plan.get("postgres"):
            self.postgres()
        if plan.get("s3"):
            self.s3()  # before the MLflow server, whose artifacts may go there
        self.head(wait=False)  # the servers start while the head boots
        self.mlflow(wait=False)
        if plan.get("postgres") and "optuna" in plan["postgres"]:
            self.optuna_tables()
        self.wait_mlflow()
        self.wait_head()
        result["head_nodes"] = [n["NodeID"] for n in self.alive_nodes() or []]
        result["node_imports_project"] = self.node_can_import_project()
        result["worker_nodes"] = self.worker()
        if plan.get("drivers"):
            result["drivers"] = self.users()
            result["records"] = records(plan["records"]["experiments"], plan["records"]["optuna"],
                                        plan["records"].get("env", {}))
            result["s3_keys"] = s3_keys()
            if plan.get("find_in_s3"):
                result["found_in_s3"] = s3_objects_containing(plan["find_in_s3"])
            return result
        args = plan["args"]
        first = self.driver(args, "driver1")
        if plan.get("kill_worker_at") or plan.get("sigterm_driver_at"):
            at = plan.get("kill_worker_at") or plan.get("sigterm_driver_at")
            wait_for("the first epochs", lambda: first.poll() is not None or self.epochs_logged() >= at,
                     timeout=240)
            result["epochs_at_interruption"] = self.epochs_logged()
            if first.poll() is None and plan.get("kill_worker_at"):
                # The node dies as a machine does: its raylet and every process on it (trial actors
                # included) at once. Killing the raylet alone let an actor that had not noticed yet
                # finish its run on the dead node, so the retry on the new node was not exercised.
                raylet = self.raylet_of("worker1")
                on_node = [pid for pid, _ in descendants(self.processes["worker1"].pid)]
                for pid in [raylet, *on_node]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                log(f"killed the worker node (raylet {raylet} and {len(on_node)} processes) at "
                    f"{result['epochs_at_interruption']} epochs")
                result["worker_killed_at"] = time.time()
                self.processes["worker1"].wait(timeout=60)  # `ray start --block` exits when its raylet dies
                result["worker_nodes_after"] = self.worker()  # the dead node may still be listed a while
            elif first.poll() is None:
                first.send_signal(signal.SIGTERM)
                log("sent SIGTERM to the driver")
        first.wait(timeout=plan.get("timeout", 300))
        result["drivers"].append(first.returncode)
        if plan.get("sigterm_driver_at"):
            second = self.driver(args, "driver2")
            second.wait(timeout=plan.get("timeout", 300))
            result["drivers"].append(second.returncode)
        if plan.get("s3"):
            result["s3_keys"] = s3_keys()
        return result

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)
        self.stop_postgres()
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's sessions and logs of both nodes


# -------------------------------------------------------------------- reading back what was recorded
def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=S3_ENDPOINT, aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def s3_keys() -> list[str]:
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket="studies")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def s3_objects_containing(needles: list[str]) -> dict[str, list[str]]:
    """The bucket's objects whose bytes contain any of ``needles``: {key: [the needles found]}."""
    s3, found = s3_client(), {}
    for key in s3_keys():
        body = s3.get_object(Bucket="studies", Key=key)["Body"].read()
        hits = [s for s in needles if s.encode() in body]
        if hits:
            found[key] = hits
    return found


def records(experiments: list[str], optuna_url: str, env: dict[str, str]) -> dict:
    """What the MLflow server and the Optuna storage hold, read through their own APIs:
    every run (tags, params, metric keys) of each experiment, the parent run's artifacts (their
    text), and every Optuna study (attributes, trials)."""
    import mlflow
    import optuna
    from mlflow import MlflowClient

    os.environ.update(env)
    mlflow.set_tracking_uri(TRACKING)
    client, out = MlflowClient(TRACKING), {"mlflow": {}, "optuna": {}}
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            out["mlflow"][name] = None
            continue
        frame = mlflow.search_runs(experiment_names=[name])  # the API a lab's notebook uses
        runs = []
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            entry = {"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
                     "end_time": run.info.end_time, "tags": run.data.tags,
                     "params": run.data.params, "metrics": sorted(run.data.metrics)}
            if run.data.tags.get("nlstm.kind") == "study":
                folder = Path(tempfile.mkdtemp(prefix="artifacts-"))
                client.download_artifacts(run.info.run_id, "", str(folder))
                entry["artifacts"] = {str(p.relative_to(folder)): p.read_text(errors="replace")
                                      for p in sorted(folder.rglob("*")) if p.is_file()}
                shutil.rmtree(folder)
            runs.append(entry)
        out["mlflow"][name] = {"experiment_id": exp.experiment_id, "artifact_location": exp.artifact_location,
                               "tags": exp.tags, "search_runs_rows": len(frame), "runs": runs}
    storage = optuna.storages.RDBStorage(optuna_url)
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        out["optuna"][summary.study_name] = {
            "user_attrs": study.user_attrs,
            "trials": [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                        "user_attrs": t.user_attrs, "system_attrs": t.system_attrs} for t in study.trials]}
    return out


def main() -> int:
    work, plan = Path(sys.argv[1]).resolve(), json.loads(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    cluster = Cluster(work, plan)
    result: dict = {}
    try:
        result = cluster.run()
    except Exception as e:  # reported in result.json for the test's message
        result["error"] = f"{type(e).__name__}: {e}"
        log(result["error"])
    finally:
        cluster.close()
        (work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
