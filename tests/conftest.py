"""Shared fixtures, and the environment every test (and every process a test starts) runs in."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

import pytest

# Everything but the kernel tests runs the fused kernel's Python loops: the C++ loops are built on a
# process's first call (15-60 s on 2 cores), and the study and cluster tests start fresh worker
# processes and nodes (the cluster's worker cannot see the checkout's build cache) whose first call
# would build them again. The C++ loops are bound by tests/test_fused_cpp.py and the `fused_loops`
# fixture below, which set NLSTM_CPP themselves.
os.environ.setdefault("NLSTM_CPP", "0")


def scratch_folder() -> Path:
    """This user's temporary folder for the suite's per-user files, kept between sessions (so the
    C++ loops and matplotlib's font cache are built once): ``$TMPDIR/nlstm-tests-<uid>``, used only
    if it is this user's own folder and closed to others (else a fresh temporary folder)."""
    root = Path(tempfile.gettempdir()) / f"nlstm-tests-{os.getuid()}"
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        st = root.lstat()
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return root
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="nlstm-tests-"))


# Nothing the suite runs writes into $HOME (issue 19). What would, unless pointed elsewhere (a
# setting the user made is kept): the corpus and C++ build cache (~/.cache/nlstm), matplotlib's
# font cache and config (~/.cache/matplotlib, ~/.config/matplotlib), other per-user caches such as
# pip's in test_packaging (~/.cache), Chromium's profile and crash reports (~/.config/chromium*),
# MLflow's telemetry id (~/.config/mlflow/telemetry.json) and Ray's token (~/.ray/auth_token: every
# Ray the suite starts is private). Tune's ~/ray_results is avoided by every Tuner getting a storage
# path; `home_stays_clean` below checks all of it. Moving XDG_CONFIG_HOME would hide the user's pip
# configuration (an index, a certificate) from test_packaging's `pip wheel`: it is named explicitly.
SCRATCH = scratch_folder()
os.environ.setdefault("NLSTM_CACHE_DIR", str(SCRATCH / "cache"))
os.environ.setdefault("MPLCONFIGDIR", str(SCRATCH / "matplotlib"))
os.environ.setdefault("XDG_CACHE_HOME", str(SCRATCH / "xdg-cache"))
if "XDG_CONFIG_HOME" not in os.environ:
    _pip_config = Path.home() / ".config" / "pip" / "pip.conf"
    if _pip_config.is_file():
        os.environ.setdefault("PIP_CONFIG_FILE", str(_pip_config))
    os.environ["XDG_CONFIG_HOME"] = str(SCRATCH / "xdg-config")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Where the suite wrote into $HOME before (checked when $HOME is not empty; an empty one must stay empty).
HOME_WRITERS = ("ray_results", ".ray", ".cache/nlstm", ".cache/matplotlib", ".config/matplotlib", ".config/mlflow",
                ".config/chromium", ".config/chromium-headless", ".cache/chromium", ".pki", ".cache/torch_extensions",
                ".cache/pip", ".mlflow", ".optuna")


def _home_entries(home: Path, was_empty: bool) -> set[str]:
    """Everything under an empty-at-start $HOME; else the known writers and their entries two levels down."""
    if was_empty:
        return {str(p.relative_to(home)) for p in home.rglob("*")}
    found = set()
    for name in HOME_WRITERS:
        top = home / name
        if top.exists():
            found.add(name)
            found.update(str(p.relative_to(home)) for p in top.glob("*"))
            found.update(str(p.relative_to(home)) for p in top.glob("*/*"))
    return found


@pytest.fixture(scope="session", autouse=True)
def home_stays_clean():
    """After the session, $HOME holds nothing new: if it was empty it is still empty, else none of
    the places the suite used to write into got a new entry. Run the suite with ``HOME`` set to an
    empty folder for the strict check."""
    home = Path.home()
    was_empty = home.is_dir() and not any(home.iterdir())
    before = _home_entries(home, was_empty) if home.is_dir() else set()
    started = time.strftime("%H:%M:%S")
    yield
    new = sorted(_home_entries(home, was_empty) - before) if home.is_dir() else []
    assert not new, f"the session (started {started}) wrote into $HOME ({home}): {', '.join(new[:12])}"


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole test session (starting one costs ~4 s)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


class FusedLoops:
    """Which time loops the fused kernel's calls ran, recorded by spying on its path choice."""

    def __init__(self, path: str) -> None:
        self.path, self.choices = path, []

    def assert_used(self) -> None:
        """Every call of the test ran the loops asked for (and there was at least one)."""
        assert self.choices, "no fused whole-sequence call was made"
        want = self.path == "cpp"
        assert all(c == want for c in self.choices), f"asked for {self.path}, ran C++: {self.choices}"


def cpp_compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would use, or None (the C++ tests then skip)."""
    import shutil

    return shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(params=["python", "cpp"])
def fused_loops(request, monkeypatch):
    """Run the test once on the Python loops (``NLSTM_CPP=0``) and once on the C++ loops
    (``NLSTM_CPP=1``; skipped without a C++ compiler, failed if the build fails)."""
    from nlstm.fused import cpp, function, inference

    loops = FusedLoops(request.param)
    if request.param == "cpp":
        if cpp_compiler() is None:
            pytest.skip("no C++ compiler: the C++ loops cannot be built here")
        assert cpp.kernels() is not None, f"the C++ loops failed to build: {cpp.build_failure()}"
    monkeypatch.setenv("NLSTM_CPP", "1" if request.param == "cpp" else "0")

    def spy(x):
        ops = cpp.use_cpp(x)
        loops.choices.append(ops is not None)
        return ops

    monkeypatch.setattr(function, "use_cpp", spy)
    monkeypatch.setattr(inference, "use_cpp", spy)
    return loops
