"""Open the MLflow UI on a study's store, bound to 127.0.0.1 unless told otherwise.

    python study/ui.py [--study NAME] [--tracking-uri URI] [--host 127.0.0.1] [--port 5000]
    make ui [STUDY=NAME] [STORE=URI] [UI_HOST=127.0.0.1] [UI_PORT=5000]

Prints the address of the study's experiment page, then runs ``mlflow server`` on the store
(one worker, no job runner: about 0.5 GB and a 1 s shutdown) until Ctrl+C. The default store is
the one ``study/run.py`` writes, ``sqlite:///<cwd>/mlflow.db``. A host other than 127.0.0.1 makes
the UI reachable from the network: MLflow has no login, so only do that on a trusted network.
"""

from __future__ import annotations

import argparse
import os
import sys

from study.cli import invoked_as
from study.record.layout import EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("nlstm-ui"), description=__doc__.split("\n\n")[0])
    p.add_argument("--study", help="print the address of this study's experiment page")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")
    return p


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if host not in ("127.0.0.1", "localhost", "::1"):
        cmd += ["--allowed-hosts", "*"]  # MLflow's default middleware answers only localhost otherwise
    return cmd


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dashboards.load import StoreError, open_store
    from study.record.store import StoreError as UriError
    from study.record.store import resolve_tracking_uri

    try:  # the study command's rules: a URI, or a sqlite file path ending in .db
        uri = resolve_tracking_uri(args.tracking_uri)
    except UriError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        client = open_store(uri)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    if args.study:
        exp = client.get_experiment_by_name(args.study)
        if exp is None:
            print(f"error: no study {args.study!r} in {uri}", file=sys.stderr)
            return 2
        url += f"/#/experiments/{exp.experiment_id}/runs"
        if exp.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT:  # a study recorded before the tag existed
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT)
    cmd = server_command(uri, args.host, args.port)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"MLflow UI for {uri}: {url}  (Ctrl+C stops it)", flush=True)
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    os.execvpe(cmd[0], cmd, env)  # replace this process: Ctrl+C and kill reach the server directly
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
