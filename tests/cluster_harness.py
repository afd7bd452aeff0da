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
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from study.processes import descendants

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLFLOW_PORT, RAY_PORT, S3_PORT = 5055, 6380, 5060
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


class Cluster:
    def __init__(self, work: Path, plan: dict) -> None:
        self.work, self.plan = work, plan
        self.processes: dict[str, subprocess.Popen] = {}
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

    def mlflow(self) -> None:
        env = base_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                              f"sqlite:///{self.work / 'mlflow.db'}", "--artifacts-destination",
                              str(self.work / "mlartifacts"), "--host", "127.0.0.1", "--port", str(MLFLOW_PORT),
                              "--workers", "1"], env)
        wait_for("mlflow server", lambda: http_ok(f"http://127.0.0.1:{MLFLOW_PORT}/health"))

    def s3(self) -> None:
        self.start("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(S3_PORT)], base_env())
        wait_for("S3 server", lambda: http_ok(f"http://127.0.0.1:{S3_PORT}/moto-api/"))
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{S3_PORT}", **{
            "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
        ).create_bucket(Bucket="studies")

    def head(self) -> None:
        self.start("head", [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0", "--port", str(RAY_PORT),
                            "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(self.temp),
                            "--object-store-memory", OBJECT_STORE_MEMORY], base_env())
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
        probe = self.in_node_namespace([sys.executable, "-c", "import study.trial"])
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
    def driver(self, args: list[str], name: str) -> subprocess.Popen:
        env = base_env() | {"PYTHONPATH": str(REPO)}
        (self.work / "driver").mkdir(exist_ok=True)
        return self.start(name, [sys.executable, str(REPO / "study" / "run.py"), *args], env, cwd=self.work / "driver")

    def epochs_logged(self) -> int:
        try:
            with sqlite3.connect(f"file:{self.work / 'mlflow.db'}?mode=ro", uri=True, timeout=5) as db:
                return db.execute("select count(*) from metrics where key = 'valid_bpc'").fetchone()[0]
        except sqlite3.Error:
            return 0

    def run(self) -> dict:
        plan, result = self.plan, {"drivers": []}
        self.mlflow()
        if plan.get("token"):
            make_token(self.work / "home")
            result["token"] = True
        if plan.get("s3"):
            self.s3()
        self.head()
        result["head_nodes"] = [n["NodeID"] for n in self.alive_nodes() or []]
        result["node_imports_project"] = self.node_can_import_project()
        result["worker_nodes"] = self.worker()
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
            import boto3

            s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{S3_PORT}", aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket="studies")
            result["s3_keys"] = [o["Key"] for page in pages for o in page.get("Contents", [])]
        return result

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)
        shutil.rmtree(self.temp, ignore_errors=True)  # Ray's sessions and logs of both nodes


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
