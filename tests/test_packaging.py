"""Installed as a package (`pip install .`), the platform runs a built-in study and its report by
name from any folder, and records no git commit of a repository that merely encloses it; its
`--help` points at files the user has; requirements.txt (the dependencies alone, for worker nodes)
stays the list pyproject.toml declares."""

from __future__ import annotations

import os
import re
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
    probe = "import study.record.tracker as t; print(t.__file__); print(t.environment_info()['git_commit'])"
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
        "(ablation-depth, enwik8, long-range-plateau, long-range, ptb-cpu, ptb-tuned, ptb, smoke, text8)")


def help_epilog(env: dict, cwd: Path, *command: str) -> tuple[str, list[str], list[Path]]:
    """`--help`'s text after the options: (the text, the built-in study names it lists, the paths it names)."""
    out = subprocess.run([sys.executable, *command, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    epilog = out.stdout.split("\n\n")[-1]
    names = re.search(r"^built-in studies \(--space NAME\): (.*)$", epilog, re.M).group(1).split(", ")
    return epilog, names, [Path(p) for p in re.findall(r"(?:^|[\s(])(/[^\s;()]+)", epilog, re.M)]


def test_installed_help_lists_every_built_in_study_and_names_files_the_user_has(installed, tmp_path):
    """Issue 19 item 5: the list missed long-range, and docs/study.md is not in the wheel."""
    env = ENV | {"PYTHONPATH": str(installed)}
    epilog, names, paths = help_epilog(env, tmp_path, "-m", "study.run")
    assert sorted(names) == sorted(p.stem for p in (installed / "search_spaces").glob("*.yaml"))
    assert "long-range" in names and "smoke" in names
    assert installed / "search_spaces" in paths
    metadata = next(installed.glob("nlstm-*.dist-info/METADATA"))
    assert metadata in paths and "## Studies" in metadata.read_text()  # the README, with the section named
    assert all(p.exists() for p in paths), paths
    assert "Studies" in epilog


def test_help_in_a_checkout_names_the_format_document(tmp_path):
    epilog, names, paths = help_epilog(ENV | {"PYTHONPATH": str(REPO)}, tmp_path, str(REPO / "study" / "run.py"))
    assert sorted(names) == sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
    assert REPO / "docs" / "study.md" in paths and all(p.exists() for p in paths), paths


def requirement_lines(text: str) -> list[str]:
    """Requirement strings without comments and spaces, in their order."""
    lines = (line.split("#", 1)[0].replace(" ", "") for line in text.splitlines())
    return [line for line in lines if line]


def test_requirements_txt_is_the_projects_dependency_list():
    """requirements.txt installs the dependencies without the project (a Ray worker node); it must
    say what pyproject.toml says, or a worker node lacks (or pins differently) what trials import."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [r.replace(" ", "") for r in project["dependencies"]]
    listed = requirement_lines((REPO / "requirements.txt").read_text())
    missing, extra = sorted(set(declared) - set(listed)), sorted(set(listed) - set(declared))
    assert not missing and not extra, (f"requirements.txt differs from pyproject.toml's [project].dependencies: "
                                       f"add {missing}, remove {extra}")
    assert len(listed) == len(set(listed))


def test_constraints_pin_the_cpu_torch_within_the_declared_range():
    """constraints.txt's torch satisfies pyproject.toml's requirement (else `pip install -c` fails)."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    declared = {Requirement(r).name: Requirement(r) for r in
                tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = [Requirement(r) for r in requirement_lines((REPO / "constraints.txt").read_text())]
    for pin in pins:
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        assert declared[pin.name].specifier.contains(version), (pin, declared[pin.name])
