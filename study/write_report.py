"""Write a study's report from its MLflow runs (also while the study is still running).

    python study/write_report.py --study NAME [--tracking-uri URI] [--out DIR] [--no-log]

Writes ``DIR/report.html`` (self-contained: opens offline in any browser), ``DIR/report.md`` with
the same tables, ``DIR/figures/*.png`` and ``DIR/tables/*.csv``, and logs them under ``report/``
on the study's parent run. The default store is the one ``study/run.py`` writes
(``sqlite:///<cwd>/mlflow.db``); the default ``DIR`` is ``studies/NAME/report``, next to what
``study/run.py`` writes. An unknown study or store is one line on stderr and exit code 2. The
analysis lives in ``dashboards/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from study.cli import invoked_as


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=invoked_as("nlstm-report"), description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, help="the study's name (its MLflow experiment)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--out", type=Path, help="output folder (default: studies/STUDY/report)")
    p.add_argument("--no-log", action="store_true", help="do not log the report to the study's parent run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(mlflow|sqlalchemy|alembic)(\..*)?")
    from dashboards.load import StoreError, StudyNotFoundError, load_study
    from study.record.store import StoreError as UriError
    from study.record.store import resolve_tracking_uri

    try:  # the study command's rules: a URI, or a sqlite file path ending in .db
        uri = resolve_tracking_uri(args.tracking_uri)
    except UriError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        data = load_study(args.study, uri)
    except (StoreError, StudyNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    from dashboards.report import write_report

    out = args.out or Path("studies") / args.study / "report"
    files = write_report(data, out, log_to_parent=not args.no_log)
    counts = data.trials["state"].value_counts() if len(data.trials) else {}
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("completed", "running", "pruned", "failed"))
    print(f"{args.study}: {len(data.trials)} trial runs ({summary}); {len(files.figures)} figures")
    print(f"report: {files.html}  (markdown: {files.markdown})")
    if files.logged_to:
        print(f"logged to the parent run {files.logged_to} under report/")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
