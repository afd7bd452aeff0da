"""Run a study: one YAML file -> Ray Tune trials sampled by Optuna -> MLflow.

    nlstm-study --space smoke                                        # a built-in study, from any folder
    python study/run.py --space search_spaces/smoke.yaml             # run (or resume) it
    python study/run.py --space search_spaces/ptb-cpu.yaml --dry-run # the plan, nothing written
    python study/run.py --space search_spaces/ptb.yaml --smoke       # the same study, shrunk

By default Ray is a private local instance and MLflow a sqlite file ``./mlflow.db`` (or
``$MLFLOW_TRACKING_URI``); the Ray experiments and best checkpoints go to ``./studies/<name>/``,
the search's Optuna study to ``./studies/<name>/optuna.db``. On a cluster (``--address``) the
project's code is shipped to every node, and the study needs a tracking server and ``--storage``
that every node reaches (docs/study.md, "Run on a cluster").
Re-running the same command after Ctrl+C, SIGTERM or a killed driver resumes the study. Exit
codes: 0 done; 1 the study failed (most trials of a phase failed, another driver holds the
study, or an error); 2 bad study file or arguments (nothing written); 130 interrupted by
Ctrl+C, 143 by SIGTERM (rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.cli import invoked_as
from study.record.layout import PHASES, TRIAL_SLOTS_TAG
from study.record.redact import mask_url
from study.spec.errors import SpecError
from study.spec.load import load_spec
from study.spec.schema import StudySpec
from study.spec.smoke import shrink_for_smoke

REPO_ROOT = Path(__file__).resolve().parents[1]

ADDRESS_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 5.0  # for the Ray GCS's first HTTP/2 frame (it answers in milliseconds)
# A gRPC server (Ray's GCS, the Ray Client server) speaks HTTP/2: to the client's connection
# preface (RFC 9113 section 3.4) it answers with a SETTINGS frame, the first frame it sends.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP2_EMPTY_SETTINGS = bytes([0, 0, 0, 0x4, 0, 0, 0, 0, 0])  # length 0, type SETTINGS, no flags, stream 0
# ray.init(address=...) tries the GCS this many times (about 40 s each at Ray's defaults) instead
# of 20 (about 13 minutes) when something answers at the address but is not a Ray GCS.
RAY_CONNECT_ATTEMPTS = "1"


class UsageError(ValueError):
    """Bad input found before anything was written: one line, exit code 2."""


def _number(kind: type, low: float, inclusive: bool) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (not inclusive and value == low):
            raise argparse.ArgumentTypeError(f"expected a number {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from study.spec.catalog import builtin_studies

    studies = builtin_studies()
    folder = next(iter(studies.values())).parent if studies else None
    if (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "docs" / "study.md").is_file():  # a checkout
        formats = f"The study file format in full: {REPO_ROOT / 'docs' / 'study.md'}"
    else:  # installed: docs/ is not in the wheel, the README is (as the package's description)
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            dist = distribution("nlstm")
            meta = next((f for f in dist.files or [] if f.name == "METADATA"), None)
        except PackageNotFoundError:
            meta = None
        where = f" (in {Path(str(dist.locate_file(meta))).resolve()})" if meta else ""
        formats = (f"The study file format: the README's \"Studies\" section, shipped as this package's "
                   f"description{where};\nin full in docs/study.md of the project's source.")
    epilog = (f"built-in studies (--space NAME): {', '.join(studies)}\n"
              + (f"their files, annotated examples of the format: {folder}\n" if folder else "") + formats)
    p = argparse.ArgumentParser(prog=invoked_as("nlstm-study"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    add = p.add_argument
    add("--space", required=True, type=Path, metavar="FILE", help="the study file (YAML), or the name of a built-in "
        "study (listed below)")
    add("--dry-run", action="store_true", help="validate and print the trial plan (configurations, widths, "
        "parameter counts, estimated duration); train and write nothing")
    add("--smoke", action="store_true", help="the same study shrunk as its `smoke` section says (tiny data, 1-2 "
        "epochs), as study <name>-smoke")
    add("--phases", metavar="LIST", help=f"comma-separated subset of the study's phases ({', '.join(PHASES)})")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI, or a sqlite file path ending in .db "
        "(default: $MLFLOW_TRACKING_URI, else sqlite:///$PWD/mlflow.db)")
    add("--address", metavar="ADDR", help="an existing Ray cluster (HOST:PORT or auto; a token cluster needs "
        "RAY_AUTH_MODE=token and its token, see docs/study.md); default: $RAY_ADDRESS, else a private local Ray. "
        "Needs --storage and an MLflow server (--tracking-uri http://...)")
    add("--storage", metavar="PATH_OR_URI", help="where Tune keeps the trials' state and checkpoints: a folder "
        "mounted at the same path on every node, or s3://bucket/prefix (?endpoint_override=http://HOST:PORT or "
        "$AWS_ENDPOINT_URL for an S3-compatible server); default ./studies/<name>/ray for a local Ray")
    add("--optuna-storage", metavar="URL", help="the search's Optuna study: an RDB URL (sqlite:////abs/x.db, "
        "postgresql://...) or a journal file path ending in .log (default: sqlite <output>/<name>/optuna.db)")
    add("--cpus-per-trial", type=_number(float, 0, False), metavar="N",
        help="CPUs (and torch threads) per trial (default: the file's)")
    add("--gpus-per-trial", type=_number(float, 0, True), metavar="F",
        help="GPUs per trial, fractional to share one (default: the file's)")
    add("--max-concurrent", type=_number(int, 1, True), metavar="N",
        help="trials at a time (default: as many as the CPUs/GPUs allow)")
    add("--data-dir", type=Path, metavar="DIR", help="folder with the corpus files (default: $NLSTM_DATA_DIR, the "
        "cache, or a download)")
    add("--output", type=Path, default=Path("studies"), metavar="DIR", help="where <name>/ goes (default ./studies)")
    add("--restart", action="store_true", help="discard this study's earlier runs and results first")
    add("--verbose", action="store_true", help="Ray's own tables and worker output instead of the progress line")
    return p


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run ..." lines in progress
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a rerun reads spec.json back
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output prints banners even at verbose=0
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also reaches the Ray workers
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # a failed trial is said once, by the driver
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its level when imported
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ..." per run with a server
        warnings.filterwarnings("ignore")
        for name in ("mlflow", "alembic", "ray", "ray.train", "optuna", "filelock"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # a store error is raised and said in one line by the driver; MLflow also logs it with its traceback
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial gets one line, not a traceback
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Setup:
    """Everything checked before anything is written."""

    spec: StudySpec
    phases: list[str]
    cpus: float
    gpus: float
    corpus: Any
    data_dir: str | None
    tracking_uri: str
    study_dir: Path
    storage: Any = None  # study.driver.cluster.Storage: the Ray experiments' root (None for --dry-run)
    optuna_url: str = ""
    checkpoints_dir: str = ""  # a resumed study's recorded checkpoint folder (default: <study_dir>/checkpoints)


def _split_address(address: str) -> tuple[str, int]:
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected auto or HOST:PORT")
    return host.strip("[]"), int(port)


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """An unreachable Ray address makes ``ray.init`` retry for minutes: try the port first."""
    if address in ("auto", "local"):
        return
    host, port = _split_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def check_ray_answers(address: str, timeout_s: float = ADDRESS_TIMEOUT_S,
                      answer_timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Something that accepts connections but is not Ray (an MLflow server's port, a silent
    listener) made ``ray.init`` print GCS warnings for minutes, after the study had written its
    record. Ray's GCS (and the Ray Client server) is a gRPC server: it answers the HTTP/2 client
    preface with a SETTINGS frame. Skipped with ``RAY_USE_TLS`` (the GCS then speaks TLS first)."""
    if address in ("auto", "local") or os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return
    host, port = _split_address(address)
    answer, closed = b"", False
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as conn:
            conn.sendall(HTTP2_PREFACE + HTTP2_EMPTY_SETTINGS)
            deadline = time.monotonic() + answer_timeout_s
            while len(answer) < 9 and (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                chunk = conn.recv(64)
                closed = not chunk
                if closed:
                    break
                answer += chunk
    except TimeoutError:
        pass
    except OSError as e:  # refused, or reset by a server that hung up on the preface
        closed = True
        if not answer and not isinstance(e, ConnectionResetError):
            raise UsageError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None
    frame = answer[:9]
    if len(frame) == 9 and frame[3] == 0x4 and not frame[4] & 0x1 and frame[5:9] == bytes(4):
        return  # a SETTINGS frame (not an ACK) on stream 0: an HTTP/2 server
    first_line = answer.split(b"\r\n")[0][:40]
    got = (f"it answered {first_line!r}" if answer else
           "it closed the connection" if closed else f"it did not answer in {answer_timeout_s:g} s")
    raise UsageError(f"--address {address}: something listens there but it is not a Ray cluster (Ray's GCS answers "
                     f"in HTTP/2; {got}); pass the head node's GCS port (`ray start --head --port`, 6379 by default)")


def prepare(args: argparse.Namespace) -> Setup:
    """Validate the study file, arguments, data, budgets, store and cluster address."""
    from nlstm.data import CorpusError
    from study.record.store import StoreError, check_store, resolve_tracking_uri
    from study.spec.catalog import find_study_file
    from study.spec.plan import check_budgets
    from study.trials.corpus import load_study_corpus

    try:
        args.space = find_study_file(args.space)
        spec = load_spec(args.space)
        if args.smoke:
            spec = shrink_for_smoke(spec)
    except SpecError as e:
        raise UsageError(str(e)) from None
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else spec.resources.cpus_per_trial
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else spec.resources.gpus_per_trial
    phases = spec.phases
    if args.phases:
        wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in spec.phases]
        if unknown:
            raise UsageError(f"--phases: {', '.join(unknown)} is not a phase of {args.space} "
                             f"({', '.join(spec.phases)})")
        phases = [p for p in spec.phases if p in wanted]
    try:
        tracking_uri = resolve_tracking_uri(args.tracking_uri)
    except StoreError as e:
        raise UsageError(str(e)) from None

    # Absolute paths only: Tune runs each trial in its own working directory.
    data_dir = args.data_dir or (Path(os.environ["NLSTM_DATA_DIR"]) if os.environ.get("NLSTM_DATA_DIR") else None)
    data_dir = str(data_dir.expanduser().resolve()) if data_dir else None
    try:
        corpus = load_study_corpus(spec, data_dir, download=not args.dry_run, cached=False)
    except (CorpusError, OSError, ValueError) as e:
        raise UsageError(f"{args.space}: data: {e}") from None
    try:  # --dry-run measures the models in this process; a local study's trials inherit its limits
        check_budgets(spec, len(corpus.vocab), args.space, gpus_per_trial=gpus,
                      concurrency=local_concurrency(args, cpus), local=args.dry_run or not args.address)
    except SpecError as e:
        raise UsageError(str(e)) from None

    local_cpus = os.cpu_count() or 1
    if not args.address and not args.dry_run:
        if gpus > 0:
            import torch

            if not torch.cuda.is_available():
                raise UsageError(f"--gpus-per-trial {gpus:g}: this machine has no GPU that torch can use "
                                 "(torch.cuda.is_available() is False); use --gpus-per-trial 0 or --address a GPU "
                                 "cluster")
        if cpus > local_cpus:
            raise UsageError(f"--cpus-per-trial {cpus:g}: this machine has {local_cpus} CPUs (a trial asking for "
                             "more would wait forever)")
    study_dir = args.output.expanduser().resolve() / spec.name
    storage, optuna_url = None, ""
    if not args.dry_run:
        try:
            check_store(tracking_uri)
        except StoreError as e:
            raise UsageError(str(e)) from None
        _check_output(study_dir)
        if args.address:
            check_address(args.address)
        storage, optuna_url = _check_cluster_storage(args, tracking_uri, study_dir)
        if args.address:  # last: the other checks are local and quick
            check_ray_answers(args.address)
    return Setup(spec, phases, cpus, gpus, corpus, data_dir, tracking_uri, study_dir, storage, optuna_url)


def _check_cluster_storage(args: argparse.Namespace, tracking_uri: str, study_dir: Path) -> tuple[Any, str]:
    """The tracking store, Tune storage and Optuna storage, checked for where the trials run."""
    from study.driver.cluster import ClusterError, check_tracking_for_cluster, resolve_storage
    from study.record.store import StoreError, check_path_names, scheme_of
    from study.search.optuna_store import OptunaStoreError, check_optuna_storage, resolve_optuna_url

    try:
        if args.address:
            check_tracking_for_cluster(tracking_uri)
        optuna_url = resolve_optuna_url(args.optuna_storage, study_dir)
        if args.optuna_storage:  # the default is a file of the study folder, checked with --output
            check_optuna_storage(optuna_url)
        if args.storage and scheme_of(args.storage) in ("", "file"):
            check_path_names(Path(args.storage.removeprefix("file://")).expanduser(), "--storage")
        return resolve_storage(args.storage, args.address, study_dir), optuna_url
    except (ClusterError, OptunaStoreError, StoreError) as e:
        raise UsageError(str(e)) from None


def _check_output(study_dir: Path) -> None:
    from study.record.store import StoreError, check_path_names, check_writable_folder, existing_ancestor

    try:
        check_path_names(study_dir, "--output")
    except StoreError as e:
        raise UsageError(str(e)) from None
    existing = existing_ancestor(study_dir)
    if not existing.is_dir():
        raise UsageError(f"--output: {existing} is not a folder")
    try:
        check_writable_folder(existing, "--output")
    except StoreError as e:
        raise UsageError(str(e)) from None


def local_concurrency(args: argparse.Namespace, cpus: float) -> int:
    """Trials at a time on this machine's CPUs (``--max-concurrent`` caps it)."""
    concurrency = max(1, int((os.cpu_count() or 1) // cpus))
    return min(concurrency, args.max_concurrent) if args.max_concurrent else concurrency


def print_plan(args: argparse.Namespace, setup: Setup) -> None:
    import torch

    from study.spec.plan import build_plan

    concurrency = local_concurrency(args, setup.cpus)
    measure = not (setup.gpus > 0 and not torch.cuda.is_available())  # CPU timings say nothing of a GPU study
    print(build_plan(setup.spec, setup.corpus, setup.cpus, setup.gpus, concurrency, measure=measure))


def start_ray(args: argparse.Namespace) -> bool:
    """Connect to (or start) Ray; False if this process was already connected (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return False
    from study.driver.cluster import runtime_env

    level = logging.INFO if args.verbose else logging.ERROR
    if args.address:  # other machines: the project's code travels with the job
        # Bounded: Ray reads this when ray.init connects (ray._private.node's GCS client loop; unset, it
        # makes 20 attempts of about 40 s each). A value the user set is kept.
        previous = os.environ.get("RAY_gcs_server_port_wait_time_s")
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", RAY_CONNECT_ATTEMPTS)
        try:
            ray.init(address=args.address, runtime_env=runtime_env(), log_to_driver=args.verbose,
                     logging_level=level)
        finally:
            if previous is None:
                os.environ.pop("RAY_gcs_server_port_wait_time_s", None)
        return True
    # Trials import `study` and `nlstm` from this checkout even without `pip install -e .`.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=args.verbose,
             logging_level=level)
    return True


def may_use_fused_cpu(args: argparse.Namespace, setup: Setup) -> bool:
    """Whether this study's trials run the fused kernel on this machine's CPUs: a private local Ray, no GPU
    per trial, and the fused kernel as the default or as a value searched or ablated."""
    spec = setup.spec
    varied = [*(spec.search.space if spec.search else {}), *(spec.ablation.factors if spec.ablation else {})]
    return not args.address and setup.gpus == 0 and (spec.model.impl == "fused" or "impl" in varied)


def build_cpu_loops(args: argparse.Namespace, setup: Setup) -> None:
    """Compile the fused kernel's C++ loops in the driver, before the study's wall time starts: a one-time cost of
    the machine (15-60 s), not of the study, whose first trials would otherwise build it while the others wait
    on its lock. Trials then load it in about 0.4 s. A cluster's nodes (other CPUs, other flags) each build
    their own, outside a trial's training time (``Trainer.fit``)."""
    if not may_use_fused_cpu(args, setup):
        return
    from nlstm.fused import cpp

    start = time.monotonic()
    ready = cpp.prepare()
    took = time.monotonic() - start
    if took > 2:  # a build, not a load of the cached library (0.4 s)
        outcome = "built its C++ loops" if ready else "could not build its C++ loops (the Python loops run)"
        print(f"fused kernel: {outcome} in {took:.0f} s, once per environment", flush=True)


def trial_concurrency(args: argparse.Namespace, cpus: float, gpus: float) -> int:
    """Trials at a time on the cluster; a trial asking for more than it has would wait forever."""
    import ray

    cluster = ray.cluster_resources()
    if gpus > 0 and cluster.get("GPU", 0) < gpus:
        raise UsageError(f"--gpus-per-trial {gpus:g}: the Ray cluster has {cluster.get('GPU', 0):g} GPU(s); "
                         "a trial asking for more would wait forever")
    if cluster.get("CPU", 0) < cpus:
        raise UsageError(f"--cpus-per-trial {cpus:g}: the Ray cluster has only {cluster.get('CPU', 0):g} CPUs")
    concurrency = max(1, int(cluster.get("CPU", 1) // cpus))
    if gpus > 0:
        concurrency = min(concurrency, max(1, int(cluster.get("GPU", 0) // gpus)))
    return min(concurrency, args.max_concurrent) if args.max_concurrent else concurrency


def handle_signals(reasons: list[str]) -> Any:
    """SIGTERM behaves like Ctrl+C: Tune stops its trials, runs are marked, the study can be resumed.
    (ray.init installs a SIGTERM handler that exits at once; this replaces it.) Returns the
    handler it replaced."""
    def on_sigterm(signum: int, frame: Any) -> None:
        reasons.append("SIGTERM")
        signal.raise_signal(signal.SIGINT)  # Tune's own SIGINT handler stops the trials gracefully

    return signal.signal(signal.SIGTERM, on_sigterm)


class StoreUnreachable(RuntimeError):
    """The tracking store stopped answering while the study ran."""


def run_study(args: argparse.Namespace, setup: Setup) -> int:
    import _thread

    import ray

    from study.driver.phases import StudyFailed, StudyInterrupted, run_phases
    from study.driver.processes import DriverRecord
    from study.record.folder import FolderInUse, FolderLock
    from study.record.lease import DISK_FULL_ALARM, LeaseHeld, LeaseLost
    from study.record.store import limit_http_retries, sqlite_path
    from study.record.tracker import StudyConflict, StudyTracker
    from study.search.optuna_store import OptunaStoreError, check_optuna_file
    from study.search.searcher import RecordMismatch, SearchIncomplete

    spec, study_dir = setup.spec, setup.study_dir
    started = time.monotonic()
    signal_reasons: list[str] = []
    previous_sigterm = handle_signals(signal_reasons)
    limit_http_retries()
    tracker, started_ray, driver, lock = None, False, None, None
    try:
        build_cpu_loops(args, setup)  # before the study's record (and its wall time) starts
        lock = FolderLock(study_dir).acquire()
        tracker = StudyTracker(setup.tracking_uri, spec, args.space.resolve(), study_dir)

        def lost(reason: str) -> None:
            signal_reasons.append(reason)
            _thread.interrupt_main()

        note = tracker.acquire_lease(on_lost=lost)
        if note:
            print(note + (f"; stopped {tracker.lease.leftovers_stopped} of its leftover processes"
                          if tracker.lease.leftovers_stopped else ""), flush=True)
        driver = DriverRecord(study_dir / "driver.json")
        if driver.stop_leftovers():
            print(f"stopped the leftover Ray processes of a killed driver of this study ({study_dir})", flush=True)
        parent = tracker.find_parent()
        additions = []
        if parent is not None and not args.restart:
            additions = tracker.check_resumable(parent, setup.corpus.fingerprint)
            _use_recorded_stores(args, setup, parent.data.tags)
        if spec.search is not None:
            check_optuna_file(setup.optuna_url)  # damaged: one line naming it, before anything is written
        if args.restart:
            _clear_outputs(setup, bool(args.storage))
        if args.address:  # an existing cluster: check its resources before anything is recorded
            started_ray = start_ray(args)
            trial_concurrency(args, setup.cpus, setup.gpus)
        environment = _environment(args, setup)
        opened = time.monotonic()
        tracker.open(restart=args.restart, environment=environment, data_params=_study_params(setup),
                     tags=_study_tags(args, setup, environment))
        if additions:
            print(f"extending study {spec.name}: {'; '.join(additions)} (the finished runs are kept)", flush=True)
        run = _study_run(args, setup, tracker, environment)
        versions = tracker.code_versions()
        if len(versions) > 1:
            print("this study's runs span code versions: " + ", ".join(
                f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in sorted(versions.items())), flush=True)
        concurrency = 1
        if not ray.is_initialized() or args.address:
            started_ray = start_ray(args) or started_ray
        concurrency = trial_concurrency(args, setup.cpus, setup.gpus)
        run.max_concurrent = concurrency
        tracker.fence()
        tracker.client.set_tag(tracker.parent_run_id, TRIAL_SLOTS_TAG, str(concurrency))  # for the efficiency
        handle_signals(signal_reasons)  # again: ray.init replaced it
        driver.write()  # after Ray started: its processes are this driver's children
        tracker.lease.children = driver.children()
        print(f"study {spec.name}: {' -> '.join(setup.phases)}; {concurrency} trial(s) at a time, "
              f"{setup.cpus:g} CPU{f' + {setup.gpus:g} GPU' if setup.gpus else ''} each"
              f"{' (resuming)' if tracker.resumed else ''}", flush=True)
        run_phases(run, setup.phases)
        efficiency = _efficiency(run, time.monotonic() - opened, concurrency)
        tracker.summarize_study()
        tracker.close("FINISHED")
    except (UsageError, StudyConflict) as e:
        _close_quietly(tracker, "FAILED" if isinstance(e, UsageError) else None)
        return fail(str(e))
    except (OptunaStoreError, RecordMismatch, SearchIncomplete, FolderInUse) as e:
        _close_quietly(tracker, "FAILED" if tracker is not None and tracker.parent_run_id else None)
        return fail(str(e), code=1)
    except (LeaseHeld, LeaseLost) as e:
        _close_quietly(tracker, None)
        return fail(str(e), code=1)
    except StudyFailed as e:
        _close_quietly(tracker, "FAILED")
        return fail(str(e), code=1)
    except (KeyboardInterrupt, StudyInterrupted):
        why = signal_reasons[-1] if signal_reasons else "Ctrl+C"
        if why.startswith("another driver"):  # not a signal: the lease thread saw another driver take over
            _close_quietly(tracker, None)
            return fail(f"{why}; this driver wrote nothing more and stopped", code=1)
        if why == DISK_FULL_ALARM:  # the lease thread could not write the store: its disk is full
            _close_quietly(tracker, "KILLED")
            db = sqlite_path(setup.tracking_uri)
            return fail(f"no space left on the device of {db.parent if db else setup.study_dir}: free some space, "
                        "then rerun the same command to resume", code=1)
        if why.startswith("the tracking store"):  # the lease thread could not reach the store
            _close_quietly(tracker, "KILLED")
            return fail(f"the tracking store {mask_url(setup.tracking_uri)} is unreachable; the runs so far are "
                        "recorded: rerun the same command once it is back", code=1)
        _close_quietly(tracker, "KILLED")
        print(f"\ninterrupted ({why}): the runs so far are recorded; rerun the same command to resume\n"
              f"  {invoked_as('nlstm-study')} {' '.join(mask_url(a) for a in sys.argv[1:])}", file=sys.stderr)
        return 143 if why == "SIGTERM" else 130
    except Exception as e:
        if _is_full_disk(e):
            _close_quietly(tracker, "FAILED")
            return fail(f"no space left on the device of {_full_disk_path(e, setup)}: free some space, then rerun "
                        "the same command to resume", code=1)
        if tracker is not None and not _store_answers(setup.tracking_uri):
            return fail(f"the tracking server {mask_url(setup.tracking_uri)} is unreachable; the runs so far are "
                        "recorded: rerun the same command once it is back", code=1)
        _close_quietly(tracker, "FAILED")
        if args.verbose:
            raise
        return fail(f"{type(e).__name__}: {_one_line(e)} ({_hint(e)})", code=1)
    finally:
        if started_ray:
            ray.shutdown()
        if driver is not None:
            driver.remove()
        if lock is not None:
            lock.release()
        signal.signal(signal.SIGTERM, previous_sigterm)

    _print_done(args, setup, run, time.monotonic() - started, efficiency)
    return 0


def _close_quietly(tracker: Any, status: str | None) -> None:
    """End the parent run with ``status`` (None: only release the lease); a store that went away, or a lease
    another driver holds now, leaves the runs for the next driver to close."""
    if tracker is None:
        return
    try:
        if status is None or not tracker.parent_run_id:
            if tracker.lease is not None:
                tracker.lease.release()
            return
        tracker.close(status)
    except Exception:
        if tracker.lease is not None:
            tracker.lease.release()


def _store_answers(uri: str) -> bool:
    from study.record.store import StoreError, check_store

    try:
        check_store(uri, timeout_s=5)
        return True
    except StoreError:
        return False


def _is_full_disk(error: BaseException) -> bool:
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _full_disk_path(error: BaseException, setup: Setup) -> str:
    filename = getattr(error, "filename", None)
    return str(Path(filename).parent) if filename else str(setup.study_dir)


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:500] if text else ""


def _study_run(args: argparse.Namespace, setup: Setup, tracker: Any, environment: dict[str, Any]) -> Any:
    """The record's folders and stores bound to this driver: Ray's experiments, the checkpoints, Optuna."""
    from study.driver.cluster import bind_storage
    from study.driver.phases import StudyRun
    from study.record.folder import RecordBinding, claim_cache
    from study.record.layout import CHECKPOINTS_TAG, RECORD_VERSION
    from study.record.tracker import code_version
    from study.search.optuna_store import prepare_studies
    from study.search.space import tuning_families
    from study.trials.checkpoints import CheckpointStore

    spec, study_dir = setup.spec, setup.study_dir
    explicit_storage = bool(args.storage)
    # With --storage, a record's folder is <storage>/<name>/<parent run id>: another record's can never be
    # found there, and record.json there says whose it is.
    record_folder = setup.storage.join(spec.name, tracker.parent_run_id) if explicit_storage else None
    ray_root = record_folder.join("ray") if record_folder else setup.storage
    # No study hash: an extended study (another file hash) keeps its folder, whose checkpoints it needs.
    binding = RecordBinding(mask_url(setup.tracking_uri), tracker.experiment_id, tracker.parent_run_id, "",
                            ray_root.location, RECORD_VERSION)
    note = claim_cache(study_dir, binding)
    if note:
        print(note, flush=True)
    if record_folder is not None:
        bind_storage(record_folder, binding.as_dict())
        folder = record_folder.join("checkpoints")
        checkpoints = CheckpointStore(folder.location, folder.path, folder.filesystem)
    else:
        folder = setup.checkpoints_dir or str(study_dir / "checkpoints")
        checkpoints = CheckpointStore(folder, folder)
    tracker.fence()
    tracker.client.set_tag(tracker.parent_run_id, CHECKPOINTS_TAG, mask_url(checkpoints.location))
    optuna_storage = None
    if spec.search is not None:
        names = [f.optuna_study for f in tuning_families(spec)]
        recorded: dict[str, int] = {}
        by_family = {f.name: f.optuna_study for f in tuning_families(spec)}
        for r in tracker.trial_runs("search"):
            family = r.data.tags.get("nlstm.family", "")
            name = by_family.get(family, by_family.get("", ""))
            recorded[name] = recorded.get(name, 0) + 1
        optuna_storage = prepare_studies(setup.optuna_url, names, tracker.parent_run_id, recorded,
                                         restart=args.restart)
    return StudyRun(spec, study_dir, tracker, setup.corpus, setup.data_dir, setup.cpus, setup.gpus, 1,
                    args.verbose, sys.stdout, storage=ray_root, checkpoints=checkpoints,
                    optuna_storage=optuna_storage, optuna_location=mask_url(setup.optuna_url),
                    code_version=code_version(environment), git_commit=environment.get("git_commit"))


def _use_recorded_stores(args: argparse.Namespace, setup: Setup, tags: dict[str, str]) -> None:
    """A resumed study goes on with the Optuna storage and checkpoints its record names, from whatever folder
    the driver runs in (unless the command names others)."""
    from study.record.layout import CHECKPOINTS_TAG, OPTUNA_STORAGE_TAG

    recorded_optuna = tags.get(OPTUNA_STORAGE_TAG, "")
    if not args.optuna_storage and recorded_optuna and recorded_optuna == mask_url(recorded_optuna):
        path = recorded_optuna.removeprefix("sqlite:///")
        if "://" not in path and not Path(path).exists():
            return  # the folder that held it is gone: the study's own default (a mismatch is then refused)
        setup.optuna_url = recorded_optuna
    recorded_checkpoints = tags.get(CHECKPOINTS_TAG, "")
    if not args.storage and recorded_checkpoints.startswith("/") and Path(recorded_checkpoints).is_dir():
        setup.checkpoints_dir = recorded_checkpoints


def _efficiency(run: Any, wall_s: float, slots: int) -> float | None:
    """The share of this driver's trial slots spent training; printed and logged on the study run."""
    if wall_s <= 0 or slots <= 0:
        return None
    value = run.train_time_s / (wall_s * slots)
    run.tracker.log_efficiency(value)
    return value


def _clear_outputs(setup: Setup, explicit_storage: bool) -> None:
    """``--restart``: the study folder (but the driver's lock and record) and, with ``--storage``, its record
    folders there."""
    import shutil

    for entry in setup.study_dir.iterdir():
        if entry.name not in ("driver.json", ".lock"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if explicit_storage:
        setup.storage.join(setup.spec.name).delete()


def _environment(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """environment.json of the parent run: the machine and packages, and this run's settings and data
    (URLs and the command line with their passwords masked: study.record.redact)."""
    from study.record.tracker import environment_info

    spec, corpus, cpus, gpus = setup.spec, setup.corpus, setup.cpus, setup.gpus
    return environment_info({"threads": {"torch_threads_per_trial": max(1, int(cpus)), "cpus_per_trial": cpus,
                                         "gpus_per_trial": gpus},
                             "ray_address": mask_url(args.address or "local"), "smoke": args.smoke,
                             "storage": mask_url(setup.storage.location), "optuna_storage": mask_url(setup.optuna_url),
                             "command": [mask_url(a) for a in sys.argv],
                             "data": {"corpus": spec.data.corpus, "fingerprint": corpus.fingerprint,
                                      "source": corpus.source, "source_sha256": corpus.checksums,
                                      "tokens": {"train": len(corpus.train), "valid": len(corpus.valid),
                                                 "test": len(corpus.test)}}})


def _study_params(setup: Setup) -> dict[str, Any]:
    """The parent run's params (docs/mlflow-layout.md): what never changes over the study's life."""
    from study.search.space import sampler_description, scheduler_description

    spec, corpus = setup.spec, setup.corpus
    return {"corpus": spec.data.corpus, "data_fingerprint": corpus.fingerprint, "vocab_size": len(corpus.vocab),
            "unigram_entropy_bits": round(corpus.unigram_entropy_bits(), 6), "metric": "valid_bpc",
            "sampler": sampler_description(spec), "scheduler": scheduler_description(spec)}


def _study_tags(args: argparse.Namespace, setup: Setup, environment: dict[str, Any]) -> dict[str, str]:
    """The parent run's tags that a rerun updates: the code, the search's budget and fidelity, the stores."""
    from study.record.layout import (
        CODE_VERSION_TAG,
        OPTUNA_STORAGE_TAG,
        SEARCH_BUDGET_TAG,
        SEARCH_FIDELITY_TAG,
        SEARCH_TRIALS_TAG,
    )
    from study.record.tracker import code_version
    from study.search.space import num_samples, scheduler_description
    from study.spec.plan import steps_per_epoch

    spec = setup.spec
    tags = {CODE_VERSION_TAG: code_version(environment)}
    if spec.search is not None:
        t = spec.search.train
        steps = steps_per_epoch(setup.corpus, t.model_dump())
        stop = f", patience {t.patience}" if t.patience is not None else ""
        tags |= {SEARCH_TRIALS_TAG: str(num_samples(spec)), OPTUNA_STORAGE_TAG: mask_url(setup.optuna_url),
                 SEARCH_FIDELITY_TAG: f"{t.epochs} epochs of {steps} steps{stop}; scheduler "
                                      f"{scheduler_description(spec)}"}
        if spec.search.families:
            tags[SEARCH_BUDGET_TAG] = str(spec.search.trials_per_family)
    return tags


def _print_done(args: argparse.Namespace, setup: Setup, run: Any, elapsed_s: float, efficiency: float | None) -> None:
    """Where everything the study wrote is, and how much of its slots it spent training."""
    spec = setup.spec
    minutes, seconds = divmod(int(elapsed_s), 60)
    print(f"\nstudy {spec.name} done in {minutes}:{seconds:02d}")
    if efficiency is not None:
        print(f"  study efficiency {efficiency:.2f}: {run.train_time_s:,.0f} s of trial training in this driver's "
              f"{run.max_concurrent} trial slot(s) (metric study_efficiency on the study run)")
    print(f"  MLflow:  {mask_url(setup.tracking_uri)}  (experiment {spec.name!r})")
    if setup.tracking_uri.startswith("sqlite:"):
        print(f"           browse it: mlflow ui --backend-store-uri {setup.tracking_uri}")
    print(f"  results: {setup.study_dir}  (checkpoints {run.checkpoints.location}; Ray's logs {run.storage.location})")
    if "search" in setup.phases:
        optuna_location = mask_url(setup.optuna_url)
        print(f"  Optuna:  {optuna_location}  (a study per search family: optuna-dashboard {optuna_location})")


def _hint(error: Exception) -> str:
    """Say "rerun" only where a rerun could help: a store or cluster that went away for a while."""
    from mlflow.exceptions import MlflowException

    transient = isinstance(error, (OSError, ConnectionError, TimeoutError, MlflowException)) or \
        type(error).__module__.startswith("ray")
    return "rerun to resume once it is back; --verbose shows the traceback" if transient else \
        "--verbose shows the traceback"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.address = args.address or os.environ.get("RAY_ADDRESS") or None
    if not args.address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray needs no token
    _quiet_libraries(args.verbose)
    try:
        setup = prepare(args)
    except UsageError as e:
        return fail(str(e))
    if args.dry_run:
        print_plan(args, setup)
        return 0
    return run_study(args, setup)


if __name__ == "__main__":
    sys.exit(main())
