"""Installed as a package (`pip install .`), the platform runs a built-in study and its report by
name from any folder, and records no git commit of a repository that merely encloses it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = os.environ | {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, unpacked into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # pip builds in the source tree: a copy keeps build/ out of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for package in ("nlstm", "study", "dashboards", "search_spaces"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("nlstm-*.whl")
    target = out / "site"
    zipfile.ZipFile(wheel).extractall(target)
    return target


def test_the_wheel_ships_the_built_in_studies_and_the_commands(installed):
    assert {p.name for p in (installed / "search_spaces").glob("*.yaml")} >= {"smoke.yaml", "ptb.yaml"}
    entry_points = next(installed.glob("nlstm-*.dist-info/entry_points.txt")).read_text()
    commands = ("nlstm-study = study.run:main", "nlstm-report = study.write_report:main", "nlstm-ui = study.ui:main")
    for command in commands:
        assert command in entry_points


@pytest.mark.parametrize("space", ["smoke", "smoke.yaml"])
def test_an_installed_package_runs_a_built_in_study_by_name_from_any_folder(installed, tmp_path, space):
    env = ENV | {"PYTHONPATH": str(installed)}  # before the editable checkout on sys.path
    out = subprocess.run([sys.executable, "-m", "study.run", "--space", space, "--dry-run"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "study smoke" in out.stdout and "dry run: nothing was trained or written." in out.stdout
    probe = "import study.tracking as t; print(t.__file__); print(t.environment_info()['git_commit'])"
    where, commit = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                                   text=True, timeout=120).stdout.split()
    assert where.startswith(str(installed)) and commit == "None"


def test_the_console_commands_name_themselves_and_find_studies_by_name(tmp_path):
    study = BIN / "nlstm-study"
    if not study.exists():
        pytest.skip("the console scripts are installed by `make install` (pip install -e .)")
    out = subprocess.run([str(study), "--space", "smoke", "--dry-run"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "dry run" in out.stdout, out.stderr
    for command in ("nlstm-study", "nlstm-report", "nlstm-ui"):
        usage = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, timeout=120).stdout
        assert usage.startswith(f"usage: {command} "), usage[:200]
    wrong = subprocess.run([str(study), "--space", "nope"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip() == (
        "error: nope: no such file, nor a built-in study "
        "(ablation-depth, enwik8, long-range, ptb-cpu, ptb, smoke, text8)")
