"""Run a study: one YAML file -> Ray Tune trials sampled by Optuna -> MLflow.

    python study/run.py --space search_spaces/smoke.yaml             # run (or resume) it
    python study/run.py --space search_spaces/ptb-cpu.yaml --dry-run # the plan, nothing written
    python study/run.py --space search_spaces/ptb.yaml --smoke       # the same study, shrunk

By default Ray is a private local instance and MLflow a sqlite file ``./mlflow.db``; the Ray
experiments and best checkpoints go to ``./studies/<name>/``. Re-running the same command after
Ctrl+C or a killed driver resumes the study. Exit codes: 0 done, 2 bad study file or arguments
(nothing written), 130 interrupted (rerun to resume), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python study/run.py`: import the package, not the folder's modules
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(REPO_ROOT))

from study.spec import PHASES, SpecError, load_spec, shrink_for_smoke  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python study/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The study file format: docs/study.md")
    add = p.add_argument
    add("--space", required=True, type=Path, metavar="FILE", help="the study file (YAML), e.g. search_spaces/ptb.yaml")
    add("--dry-run", action="store_true", help="validate and print the trial plan (configurations, widths, "
        "parameter counts, estimated duration); train and write nothing")
    add("--smoke", action="store_true", help="the same study shrunk as its `smoke` section says (tiny data, 1-2 "
        "epochs), as study <name>-smoke")
    add("--phases", metavar="LIST", help=f"comma-separated subset of the study's phases ({', '.join(PHASES)})")
    add("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///$PWD/mlflow.db)")
    add("--address", metavar="ADDR", help="an existing Ray cluster (auto or HOST:PORT; needs RAY_AUTH_MODE=token "
        "and the cluster's token, see docs/study.md); default: a private local Ray")
    add("--cpus-per-trial", type=float, metavar="N", help="CPUs (and torch threads) per trial (default: the file's)")
    add("--gpus-per-trial", type=float, metavar="F", help="GPUs per trial, fractional to share one (default: the "
        "file's)")
    add("--max-concurrent", type=int, metavar="N", help="trials at a time (default: as many as the CPUs/GPUs allow)")
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
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the new output prints banners even at verbose=0
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # also reaches the Ray workers
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its level when imported
        warnings.filterwarnings("ignore")
        for name in ("mlflow", "alembic", "ray", "ray.train", "optuna", "filelock"):
            logging.getLogger(name).setLevel(logging.ERROR)
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed trial gets one line, not a traceback
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _leftover_cleanup(study_dir: Path) -> None:
    """After a driver was killed (SIGKILL), two Ray agents of its private cluster outlive it in
    its process group; stop exactly those before starting again."""
    info_file = study_dir / "driver.json"
    if not info_file.is_file() or not Path("/proc").is_dir():
        return
    try:
        info = json.loads(info_file.read_text())
        pid, pgid = int(info["pid"]), int(info["pgid"])
    except (ValueError, KeyError, OSError):
        return
    if Path(f"/proc/{pid}").exists():
        raise RuntimeError(f"this study is already running (driver pid {pid}); wait for it or stop it first")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc.name)) != pgid:
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if cmd.startswith("ray::") or "/ray/" in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _start_ray(args: argparse.Namespace, verbose: bool) -> bool:
    """Connect to (or start) Ray; False if this process was already connected (tests, notebooks)."""
    import ray

    if ray.is_initialized():
        return False
    if args.address:
        ray.init(address=args.address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
        return True
    # Trials import `study` and `nlstm` from this checkout even without `pip install -e .`.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.ERROR)
    return True


def _check_cluster(cpus: float, gpus: float) -> str | None:
    """A trial asking for more than the cluster has would wait forever: say so at once."""
    import ray

    cluster = ray.cluster_resources()
    if gpus > 0 and cluster.get("GPU", 0) < gpus:
        return (f"--gpus-per-trial {gpus:g}: the Ray cluster has {cluster.get('GPU', 0):g} GPU(s); "
                "a trial asking for more would wait forever")
    if cluster.get("CPU", 0) < cpus:
        return f"--cpus-per-trial {cpus:g}: the Ray cluster has only {cluster.get('CPU', 0):g} CPUs"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local Ray needs no token
    _quiet_libraries(args.verbose)

    # ---- validate everything before anything is written
    try:
        spec = load_spec(args.space)
        if args.smoke:
            spec = shrink_for_smoke(spec)
    except SpecError as e:
        return fail(str(e))
    resources = spec.resources
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else resources.cpus_per_trial
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else resources.gpus_per_trial
    if cpus <= 0 or gpus < 0:
        return fail("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
    phases = spec.phases
    if args.phases:
        phases = [p.strip() for p in args.phases.split(",") if p.strip()]
        unknown = [p for p in phases if p not in spec.phases]
        if unknown:
            return fail(f"--phases: {', '.join(unknown)} is not a phase of {args.space} ({', '.join(spec.phases)})")
        phases = [p for p in spec.phases if p in phases]

    from nlstm.data import CorpusError
    from study.plan import build_plan, check_budgets
    from study.trial import load_study_corpus

    # Absolute paths only: Tune runs each trial in its own working directory.
    data_dir = args.data_dir or (Path(os.environ["NLSTM_DATA_DIR"]) if os.environ.get("NLSTM_DATA_DIR") else None)
    data_dir = str(data_dir.expanduser().resolve()) if data_dir else None
    try:
        corpus = load_study_corpus(spec, data_dir, download=not args.dry_run)
    except (CorpusError, OSError, ValueError) as e:
        return fail(f"{args.space}: data: {e}")
    try:
        check_budgets(spec, len(corpus.vocab))
    except ValueError as e:
        return fail(f"{args.space}: budget: expected a budget every architecture can meet ({e})")
    if gpus > 0 and not args.address and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            return fail(f"--gpus-per-trial {gpus:g}: this machine has no GPU that torch can use "
                        "(torch.cuda.is_available() is False); use --gpus-per-trial 0 or --address a GPU cluster")
    local_cpus = os.cpu_count() or 1
    if not args.address and not args.dry_run and cpus > local_cpus:
        return fail(f"--cpus-per-trial {cpus:g}: this machine has {local_cpus} CPUs (a trial asking for more "
                    "would wait forever)")
    concurrency = max(1, int(local_cpus // cpus))
    if args.max_concurrent:
        concurrency = min(concurrency, args.max_concurrent)
    if args.dry_run:
        import torch

        measure = not (gpus > 0 and not torch.cuda.is_available())  # CPU timings say nothing of a GPU study
        print(build_plan(spec, corpus, cpus, gpus, concurrency, measure=measure))
        return 0

    # ---- run
    from study.phases import StudyInterrupted, StudyRun, run_phase
    from study.tracking import StudyConflict, StudyTracker, environment_info

    started = time.monotonic()
    tracking_uri = args.tracking_uri or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        tracking_uri = f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).resolve()}"
    elif "://" not in tracking_uri:  # a bare path: the sqlite file
        tracking_uri = f"sqlite:///{Path(tracking_uri).resolve()}"
    study_dir = (args.output.resolve()) / spec.name
    try:
        _leftover_cleanup(study_dir)
    except RuntimeError as e:
        return fail(str(e))
    if args.restart and study_dir.exists():
        import shutil

        shutil.rmtree(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "driver.json").write_text(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0)}))

    import ray

    tracker, started_ray = None, False
    try:
        if args.address:  # an existing cluster: check its resources before anything is recorded
            started_ray = _start_ray(args, args.verbose)
            problem = _check_cluster(cpus, gpus)
            if problem:
                return fail(problem)
        env = environment_info({"threads": {"torch_threads_per_trial": max(1, int(cpus)), "cpus_per_trial": cpus,
                                            "gpus_per_trial": gpus},
                                "ray_address": args.address or "local", "smoke": args.smoke,
                                "data": {"corpus": spec.data.corpus, "fingerprint": corpus.fingerprint,
                                         "source": corpus.source, "source_sha256": corpus.checksums,
                                         "tokens": {"train": len(corpus.train), "valid": len(corpus.valid),
                                                    "test": len(corpus.test)}}})
        from study.space import num_samples, sampler_description, scheduler_description

        params = {"corpus": spec.data.corpus, "data_fingerprint": corpus.fingerprint, "metric": "valid_bpc",
                  "sampler": sampler_description(spec), "scheduler": scheduler_description(spec),
                  "num_samples": num_samples(spec) if spec.search else 0}
        tracker = StudyTracker(tracking_uri, spec, args.space.resolve(), study_dir)
        try:
            tracker.open(restart=args.restart, environment=env, data_params=params)
        except StudyConflict as e:
            return fail(str(e))
        remaining = [p for p in phases if not tracker.phase_done(p)]
        if remaining:
            started_ray = _start_ray(args, args.verbose) or started_ray
            cluster = ray.cluster_resources()
            concurrency = max(1, int(cluster.get("CPU", 1) // cpus))
            if gpus > 0:
                concurrency = min(concurrency, max(1, int(cluster.get("GPU", 0) // gpus)))
            if args.max_concurrent:
                concurrency = min(concurrency, args.max_concurrent)
        print(f"study {spec.name}: {' -> '.join(phases)}; {concurrency} trial(s) at a time, "
              f"{cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''} each"
              f"{' (resuming)' if tracker.resumed else ''}", flush=True)
        run = StudyRun(spec, study_dir, tracker, corpus, data_dir, cpus, gpus, concurrency, args.verbose, sys.stdout)
        for phase in phases:
            run_phase(run, phase)
        tracker.close("FINISHED")
    except (KeyboardInterrupt, StudyInterrupted):
        if tracker is not None:
            tracker.close("KILLED")
        print(f"\ninterrupted: rerun the same command to resume\n  python study/run.py {' '.join(sys.argv[1:])}",
              file=sys.stderr)
        return 130
    except Exception as e:
        if tracker is not None:
            tracker.close("FAILED")
        if args.verbose:
            raise
        return fail(f"{type(e).__name__}: {e} (rerun to resume; --verbose shows the traceback)", code=1)
    finally:
        if started_ray:
            ray.shutdown()
        (study_dir / "driver.json").unlink(missing_ok=True)

    minutes, seconds = divmod(int(time.monotonic() - started), 60)
    print(f"\nstudy {spec.name} done in {minutes}:{seconds:02d}")
    print(f"  MLflow:  {tracking_uri}  (experiment {spec.name!r})")
    if tracking_uri.startswith("sqlite:"):
        print(f"           browse it: mlflow ui --backend-store-uri {tracking_uri}")
    contents = [what for name, what in (("search_results.json", "search_results.json"),
                                         ("best", "best checkpoints in best/"), ("ray", "Ray trials in ray/"))
                if (study_dir / name).exists()]
    print(f"  results: {study_dir}  ({', '.join(contents)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
