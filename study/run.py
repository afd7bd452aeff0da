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
from study.layout import PHASES, TRIAL_SLOTS_TAG
from study.schema import StudySpec
from study.smoke import shrink_for_smoke
from study.spec import load_spec
from study.spec_errors import SpecError

REPO_ROOT = Path(__file__).resolve().parents[1]

ADDRESS_TIMEOUT_S = 10.0


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
    from study.catalog import builtin_studies

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
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output prints banners even at verbose=0
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also reaches the Ray workers
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its level when imported
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ..." per run with a server
        warnings.filterwarnings("ignore")
        for name in ("mlflow", "alembic", "ray", "ray.train", "optuna", "filelock"):
            logging.getLogger(name).setLevel(logging.ERROR)
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
    storage: Any = None  # study.cluster.Storage: the Ray experiments' root (None for --dry-run)
    optuna_url: str = ""


def check_address(address: str, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """An unreachable Ray address makes ``ray.init`` retry for minutes: try the port first."""
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address!r}: expected auto or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise UsageError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def prepare(args: argparse.Namespace) -> Setup:
    """Validate the study file, arguments, data, budgets, store and cluster address."""
    from nlstm.data import CorpusError
    from study.catalog import find_study_file
    from study.plan import check_budgets
    from study.store import StoreError, check_store, resolve_tracking_uri
    from study.trial import load_study_corpus

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
        corpus = load_study_corpus(spec, data_dir, download=not args.dry_run)
    except (CorpusError, OSError, ValueError) as e:
        raise UsageError(f"{args.space}: data: {e}") from None
    try:
        check_budgets(spec, len(corpus.vocab), args.space, gpus_per_trial=gpus)
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
    return Setup(spec, phases, cpus, gpus, corpus, data_dir, tracking_uri, study_dir, storage, optuna_url)


def _check_cluster_storage(args: argparse.Namespace, tracking_uri: str, study_dir: Path) -> tuple[Any, str]:
    """The tracking store, Tune storage and Optuna storage, checked for where the trials run."""
    from study.cluster import ClusterError, check_tracking_for_cluster, resolve_storage
    from study.optuna_store import OptunaStoreError, resolve_optuna_url

    try:
        if args.address:
            check_tracking_for_cluster(tracking_uri)
        optuna_url = resolve_optuna_url(args.optuna_storage, study_dir)
        return resolve_storage(args.storage, args.address, study_dir), optuna_url
    except (ClusterError, OptunaStoreError) as e:
        raise UsageError(str(e)) from None


def _check_output(study_dir: Path) -> None:
    from study.store import StoreError, check_writable_folder

    existing = next(p for p in [study_dir, *study_dir.parents] if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output: {existing} is not a folder")
    try:
        check_writable_folder(existing, "--output")
    except StoreError as e:
        raise UsageError(str(e)) from None


def print_plan(args: argparse.Namespace, setup: Setup) -> None:
    import torch

    from study.plan import build_plan

    concurrency = max(1, int((os.cpu_count() or 1) // setup.cpus))
    if args.max_concurrent:
        concurrency = min(concurrency, args.max_concurrent)
    measure = not (setup.gpus > 0 and not torch.cuda.is_available())  # CPU timings say nothing of a GPU study
    print(build_plan(setup.spec, setup.corpus, setup.cpus, setup.gpus, concurrency, measure=measure))


def start_ray(args: argparse.Namespace) -> bool:
    """Connect to (or start) Ray; False if this process was already connected (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return False
    from study.cluster import runtime_env

    level = logging.INFO if args.verbose else logging.ERROR
    if args.address:  # other machines: the project's code travels with the job
        ray.init(address=args.address, runtime_env=runtime_env(), log_to_driver=args.verbose, logging_level=level)
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
        print(f"fused kernel: {outcome} in {took:.0f} s, once per machine", flush=True)


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


def run_study(args: argparse.Namespace, setup: Setup) -> int:
    import _thread

    import ray

    from study.cache import RecordBinding, claim_cache
    from study.cluster import ClusterError, bind_storage
    from study.lease import LeaseHeld
    from study.optuna_store import OptunaStoreError, prepare_study
    from study.phases import StudyFailed, StudyInterrupted, StudyRun, run_phase
    from study.processes import DriverRecord
    from study.store import limit_http_retries
    from study.tracking import StudyConflict, StudyTracker

    spec, study_dir, cpus, gpus = setup.spec, setup.study_dir, setup.cpus, setup.gpus
    started = time.monotonic()
    signal_reasons: list[str] = []
    previous_sigterm = handle_signals(signal_reasons)
    limit_http_retries()
    tracker, started_ray, driver = None, False, None
    try:
        build_cpu_loops(args, setup)  # before the study's record (and its wall time) starts
        tracker = StudyTracker(setup.tracking_uri, spec, args.space.resolve(), study_dir)

        def lost(reason: str) -> None:
            signal_reasons.append(reason)
            _thread.interrupt_main()

        note = tracker.acquire_lease(on_lost=lost)
        if note:
            print(note, flush=True)
        study_dir.mkdir(parents=True, exist_ok=True)
        driver = DriverRecord(study_dir / "driver.json")
        if driver.stop_leftovers():
            print(f"stopped the leftover Ray processes of a killed driver of this study ({study_dir})", flush=True)
        explicit_storage = bool(args.storage)
        if args.restart:
            _clear_outputs(setup, explicit_storage)
        if args.address:  # an existing cluster: check its resources before anything is recorded
            started_ray = start_ray(args)
            trial_concurrency(args, cpus, gpus)
        tracker.open(restart=args.restart, environment=_environment(args, setup), data_params=_study_params(setup))
        # With --storage, a record's Ray experiments go to <storage>/<name>/<parent run id>: another
        # record's can never be found there, and record.json there says whose they are.
        storage = setup.storage.join(spec.name, tracker.parent_run_id) if explicit_storage else setup.storage
        binding = RecordBinding(setup.tracking_uri, tracker.experiment_id, tracker.parent_run_id, spec.study_hash(),
                                storage.location)
        note = claim_cache(study_dir, binding)
        if note:
            print(note, flush=True)
        if explicit_storage:
            bind_storage(storage, binding.as_dict())
        optuna_storage = None
        if "search" in setup.phases and not tracker.phase_done("search"):
            optuna_storage = prepare_study(setup.optuna_url, spec.name, tracker.parent_run_id, restart=args.restart)
        concurrency = 1
        if [p for p in setup.phases if not tracker.phase_done(p)]:
            started_ray = start_ray(args) or started_ray
            concurrency = trial_concurrency(args, cpus, gpus)
        tracker.client.set_tag(tracker.parent_run_id, TRIAL_SLOTS_TAG, str(concurrency))  # for the efficiency
        handle_signals(signal_reasons)  # again: ray.init replaced it
        driver.write()  # after Ray started: its processes are this driver's children
        print(f"study {spec.name}: {' -> '.join(setup.phases)}; {concurrency} trial(s) at a time, "
              f"{cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''} each"
              f"{' (resuming)' if tracker.resumed else ''}", flush=True)
        run = StudyRun(spec, study_dir, tracker, setup.corpus, setup.data_dir, cpus, gpus, concurrency, args.verbose,
                       sys.stdout, storage=storage, optuna_storage=optuna_storage)
        for phase in setup.phases:
            run_phase(run, phase)
        tracker.close("FINISHED")
    except UsageError as e:
        if tracker is not None:
            tracker.close("FAILED")
        return fail(str(e))
    except (ClusterError, OptunaStoreError) as e:
        if tracker is not None:
            tracker.close("FAILED")
        return fail(str(e), code=1)
    except (LeaseHeld, StudyConflict) as e:
        if tracker is not None and tracker.lease is not None:
            tracker.lease.release()
        return fail(str(e), code=1)
    except StudyFailed as e:
        tracker.close("FAILED")
        return fail(str(e), code=1)
    except (KeyboardInterrupt, StudyInterrupted):
        if tracker is not None:
            tracker.close("KILLED")
        why = signal_reasons[-1] if signal_reasons else "Ctrl+C"
        print(f"\ninterrupted ({why}): the runs so far are recorded; rerun the same command to resume\n"
              f"  {invoked_as('nlstm-study')} {' '.join(sys.argv[1:])}", file=sys.stderr)
        return 143 if why == "SIGTERM" else 130
    except Exception as e:
        if tracker is not None:
            tracker.close("FAILED")
        if args.verbose:
            raise
        return fail(f"{type(e).__name__}: {e} ({_hint(e)})", code=1)
    finally:
        if started_ray:
            ray.shutdown()
        if driver is not None:
            driver.remove()
        signal.signal(signal.SIGTERM, previous_sigterm)

    _print_done(args, setup, storage, time.monotonic() - started)
    return 0


def _clear_outputs(setup: Setup, explicit_storage: bool) -> None:
    """``--restart``: the study folder (but the driver record) and, with ``--storage``, its Ray experiments."""
    import shutil

    for entry in setup.study_dir.iterdir():
        if entry.name != "driver.json":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if explicit_storage:
        setup.storage.join(setup.spec.name).delete()


def _environment(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """environment.json of the parent run: the machine and packages, and this run's settings and data."""
    from study.tracking import environment_info

    spec, corpus, cpus, gpus = setup.spec, setup.corpus, setup.cpus, setup.gpus
    return environment_info({"threads": {"torch_threads_per_trial": max(1, int(cpus)), "cpus_per_trial": cpus,
                                         "gpus_per_trial": gpus},
                             "ray_address": args.address or "local", "smoke": args.smoke,
                             "storage": setup.storage.location, "optuna_storage": setup.optuna_url,
                             "data": {"corpus": spec.data.corpus, "fingerprint": corpus.fingerprint,
                                      "source": corpus.source, "source_sha256": corpus.checksums,
                                      "tokens": {"train": len(corpus.train), "valid": len(corpus.valid),
                                                 "test": len(corpus.test)}}})


def _study_params(setup: Setup) -> dict[str, Any]:
    """The parent run's params (docs/mlflow-layout.md)."""
    from study.space import num_samples, sampler_description, scheduler_description

    spec, corpus = setup.spec, setup.corpus
    return {"corpus": spec.data.corpus, "data_fingerprint": corpus.fingerprint, "vocab_size": len(corpus.vocab),
            "unigram_entropy_bits": round(corpus.unigram_entropy_bits(), 6), "metric": "valid_bpc",
            "sampler": sampler_description(spec), "scheduler": scheduler_description(spec),
            "num_samples": num_samples(spec) if spec.search else 0}


def _print_done(args: argparse.Namespace, setup: Setup, storage: Any, elapsed_s: float) -> None:
    """Where everything the study wrote is."""
    spec, study_dir = setup.spec, setup.study_dir
    minutes, seconds = divmod(int(elapsed_s), 60)
    print(f"\nstudy {spec.name} done in {minutes}:{seconds:02d}")
    print(f"  MLflow:  {setup.tracking_uri}  (experiment {spec.name!r})")
    if setup.tracking_uri.startswith("sqlite:"):
        print(f"           browse it: mlflow ui --backend-store-uri {setup.tracking_uri}")
    contents = [what for name, what in (("search_results.json", "search_results.json"),
                                         ("best", "best checkpoints in best/"), ("ray", "Ray trials in ray/"))
                if (study_dir / name).exists()]
    print(f"  results: {study_dir}  ({', '.join(contents)})")
    if args.storage:
        print(f"  Ray trials and checkpoints: {storage.location}")
    if "search" in setup.phases:
        print(f"  Optuna:  {setup.optuna_url}  (study {spec.name!r}; optuna-dashboard {setup.optuna_url})")


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
