"""The C++ time loops (nlstm/csrc/fused_cpu.cpp via nlstm.fused.cpp) against the reference and the
Python loops, and the fallback to the Python loops.

The main fused-vs-reference tests of test_fused.py and test_fused_denormals.py run on both loops
(the ``fused_loops`` fixture); these add widths that leave a remainder after the vectorised part
of each loop, the no-grad path, the oneDNN GEMMs inside C++, and the switches. Tests needing the
library skip when there is no C++ compiler (a fresh install needs none); with a compiler, a
failed build fails them.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cpp_compiler
from test_fused import TIGHT, assert_all_close, make_inputs, pair, run

from nlstm.fused import build_lock, cpp, function
from nlstm.fused.gemm import mkldnn_ops

needs_cpp = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler: the C++ loops cannot be built here")


@pytest.fixture
def built():
    ops = cpp.kernels()
    assert ops is not None, f"the C++ loops failed to build: {cpp.build_failure()}"
    return ops


def spy_forward(monkeypatch) -> list:
    """Record each C++ forward's weights (``w.mkldnn``: whether oneDNN's packed GEMMs were used)."""
    seen = []
    real = function.forward_loop_cpp

    def spy(ops, x, h0, c0, w, buf, train):
        seen.append(w.mkldnn)
        return real(ops, x, h0, c0, w, buf, train)

    monkeypatch.setattr(function, "forward_loop_cpp", spy)
    return seen


@needs_cpp
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("outer", ["identity", "tanh"])
def test_cpp_equals_reference_and_python_loops_float64(depth, outer, built, monkeypatch):
    """Width 13 and batch 5: every element-wise loop has a vector part and a remainder. Every output
    (memories included) and every gradient (x, state, weights), against the reference to 1e-10
    and against the Python loops to 1e-12."""
    ref, fus = pair(depth, outer, input_size=5, hidden=13)
    x, state = make_inputs(depth, True, 7, B=5, input_size=5, hidden=13)
    seen = spy_forward(monkeypatch)
    monkeypatch.setenv("NLSTM_CPP", "1")
    got_out, got_grads = run(fus, x, state, True)
    assert seen == [False]
    want_out, want_grads = run(ref, x, state, True)
    assert_all_close(got_out, want_out, **TIGHT)
    assert_all_close(got_grads, want_grads, **TIGHT)
    monkeypatch.setenv("NLSTM_CPP", "0")
    py_out, py_grads = run(fus, x, state, True)
    assert seen == [False]  # the Python loops ran
    assert_all_close(got_out, py_out, atol=1e-12, rtol=1e-12)
    assert_all_close(got_grads, py_grads, atol=1e-12, rtol=1e-12)


@needs_cpp
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cpp_inference_equals_reference_float64(depth, built, monkeypatch):
    """The no-grad forward (no S buffer written) against the reference, memories included."""
    monkeypatch.setenv("NLSTM_CPP", "1")
    ref, fus = pair(depth, "tanh", input_size=5, hidden=13)
    x = torch.randn(5, 9, 5, dtype=torch.float64)
    state = (torch.randn(5, 13, dtype=torch.float64), tuple(torch.randn(5, 13, dtype=torch.float64)
                                                            for _ in range(depth)))
    calls = []
    real = cpp.forward_loop_cpp

    def spy(ops, x, h0, c0, w, buf, train):
        calls.append(train)
        return real(ops, x, h0, c0, w, buf, train)

    monkeypatch.setattr("nlstm.fused.inference.forward_loop_cpp", spy)
    with torch.no_grad():
        got = fus(x, state, return_memories=True)
        want = ref(x, state, return_memories=True)
    assert calls == [False]
    assert_all_close([got[0], got[1][0], *got[1][1], *got[2]], [want[0], want[1][0], *want[1][1], *want[2]], **TIGHT)


@needs_cpp
@pytest.mark.skipif(not mkldnn_ops(), reason="this torch build has no oneDNN linear ops")
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_cpp_with_onednn_gemms_float32(depth, built, monkeypatch):
    """float32 at widths where the C++ loops call oneDNN's packed GEMMs (threshold lowered to reach
    them at a test's size): against the reference and the C++ loops on ATen's GEMMs."""
    assert cpp.onednn_in_cpp(64, 10**4), "the library's oneDNN calls failed their check"
    monkeypatch.setenv("NLSTM_CPP", "1")
    monkeypatch.setattr(cpp, "MIN_ONEDNN_STEP_MACS", 1)
    seen = spy_forward(monkeypatch)
    ref, fus = pair(depth, dtype=torch.float32, input_size=24, hidden=40)
    x, state = make_inputs(depth, True, 9, B=5, input_size=24, hidden=40, dtype=torch.float32)
    got_out, got_grads = run(fus, x, state, True)
    want_out, want_grads = run(ref, x, state, True)
    assert_all_close(got_out, want_out, atol=2e-5, rtol=1e-4)
    assert_all_close(got_grads, want_grads, atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(cpp, "MIN_ONEDNN_STEP_MACS", 10**15)
    gen_out, gen_grads = run(fus, x, state, True)
    assert seen == [True, False]
    assert_all_close(got_out, gen_out, atol=2e-5, rtol=1e-4)
    assert_all_close(got_grads, gen_grads, atol=1e-4, rtol=1e-4)


def test_cpp_off_runs_the_python_loops_without_building(monkeypatch):
    """``NLSTM_CPP=0``: no build is attempted (so no warning), the Python loops run."""
    monkeypatch.setenv("NLSTM_CPP", "0")
    monkeypatch.setattr(cpp, "_STATE", {})

    def must_not_build():
        raise AssertionError("NLSTM_CPP=0 must not build the library")

    monkeypatch.setattr(cpp, "_build", must_not_build)
    ref, fus = pair(2)
    x, state = make_inputs(2, True, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_out, got_grads = run(fus, x, state, False)
    want_out, want_grads = run(ref, x, state, False)
    assert_all_close(got_out, want_out, **TIGHT)
    assert_all_close(got_grads, want_grads, **TIGHT)
    assert cpp._STATE == {}


@pytest.mark.parametrize("setting", [None, "1"])
def test_failed_build_falls_back_with_one_warning(setting, monkeypatch):
    """A build that fails (no compiler, a compile error) leaves the Python loops running, with one
    warning line that says why, once per process; the library is not tried again."""
    if setting is None:  # the default
        monkeypatch.delenv("NLSTM_CPP", raising=False)
    else:
        monkeypatch.setenv("NLSTM_CPP", setting)
    monkeypatch.setattr(cpp, "_STATE", {})
    attempts = []

    def failing_build():
        attempts.append(1)
        raise RuntimeError("Error building extension 'nlstm_fused_cpu':\nc++: not found")

    monkeypatch.setattr(cpp, "_build", failing_build)
    ref, fus = pair(2)
    x, state = make_inputs(2, True, 5)
    with pytest.warns(RuntimeWarning, match=r"could not be built, using the Python loops \(RuntimeError: Error "
                      r"building extension 'nlstm_fused_cpu' \.\.\. c\+\+: not found\)") as w:
        got_out, got_grads = run(fus, x, state, False)
    assert len(w) == 1 and "\n" not in str(w[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fus(x)  # the inference path too: no second warning, no second attempt
        run(fus, x, state, False)
    assert attempts == [1]
    want_out, want_grads = run(ref, x, state, False)
    assert_all_close(got_out, want_out, **TIGHT)
    assert_all_close(got_grads, want_grads, **TIGHT)


def test_no_compiler_fails_the_build_with_a_short_reason(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RuntimeError, match=r"^no C\+\+ compiler found \('/nonexistent/c\+\+'"):
        cpp._build()


def test_failure_reason_is_one_line_naming_the_problem():
    e = RuntimeError("Error building extension 'nlstm_fused_cpu': [1/2] c++ -MMD -O3 fused_cpu.cpp\n"
                     "FAILED: fused_cpu.o\nfused_cpu.cpp:9:10: fatal error: ATen/ops/mm.h: No such file\n")
    assert cpp.failure_reason(e) == ("RuntimeError: Error building extension 'nlstm_fused_cpu' ... "
                                     "fused_cpu.cpp:9:10: fatal error: ATen/ops/mm.h: No such file")
    assert cpp.failure_reason(OSError("x" * 1000)) == "OSError: " + "x" * 291


def test_bad_cpp_setting_is_rejected(monkeypatch):
    monkeypatch.setenv("NLSTM_CPP", "yes")
    with pytest.raises(ValueError, match="NLSTM_CPP must be one of"):
        cpp.use_cpp(torch.zeros(1))


def test_only_cpu_float_tensors_are_eligible(monkeypatch):
    """Other dtypes (and CUDA tensors, checked by device type first) never ask for the library."""
    monkeypatch.setenv("NLSTM_CPP", "1")
    monkeypatch.setattr(cpp, "kernels", lambda: pytest.fail("must not be asked"))
    assert cpp.use_cpp(torch.zeros(1, dtype=torch.bfloat16)) is None
    assert cpp.use_cpp(torch.zeros(1, device="meta")) is None


def test_build_folder_follows_the_cache_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("NLSTM_CACHE_DIR", str(tmp_path))
    folder = cpp.build_dir()
    assert folder.parent == tmp_path / "torch_extensions" and folder.name.startswith("nlstm_fused_cpu-")
    assert cpp.SOURCE.is_file()


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A lock left by a process killed mid-build would make every later process wait forever."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.touch()
    assert not cpp.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running
    old = time.time() - cpp.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    assert cpp.clear_stale_lock(tmp_path) and not lock.exists()
    assert not cpp.clear_stale_lock(tmp_path)  # nothing to remove


# ---------------------------------------------------------------- the build: one per environment, no stale lock
# Real builds through torch.utils.cpp_extension and ninja, in subprocesses, of a one-function source
# (a second to compile) instead of fused_cpu.cpp (a minute), with a C++ compiler wrapper that logs
# each compile (ninja's "-c" step) and, while a flag file exists, hangs inside it: a builder that is
# mid-build for as long as the test wants, to be killed there.

PROBE_SOURCE = 'extern "C" int nlstm_build_probe() { return 1; }\n'
BUILD_SCRIPT = """
import sys
from pathlib import Path
import torch.utils.cpp_extension as ext
import nlstm.fused.cpp as cpp
cpp.SOURCE = Path(sys.argv[1])
cpp._build()
print(ext.include_paths()[0])
print(cpp.build_dir())
"""
WRAPPER = """#!/bin/sh
case " $* " in *" -c "*)
  echo $$ >> "{log}"
  if [ -e "{block}" ]; then exec sleep 600; fi;;
esac
exec {real} "$@"
"""


class Builds:
    """A cache folder, the probe source, the logging compiler and the processes started on them."""

    def __init__(self, tmp_path) -> None:
        self.tmp, self.repo = tmp_path, Path(__file__).resolve().parents[1]
        self.source = tmp_path / "probe.cpp"
        self.source.write_text(PROBE_SOURCE)
        self.log, self.block = tmp_path / "compiles.log", tmp_path / "block"
        self.cxx = tmp_path / "c++"
        self.cxx.write_text(WRAPPER.format(log=self.log, block=self.block,
                                           real=shutil.which(os.environ.get("CXX", "c++"))))
        self.cxx.chmod(0o755)
        self.cache = tmp_path / "cache"
        self.python = sys.executable
        self.processes: list = []
        self.hanging: set[int] = set()  # compiles hanging in the wrapper, killed by the test or at the end

    def env(self, *path_first) -> dict:
        return os.environ | {"NLSTM_CACHE_DIR": str(self.cache), "CXX": str(self.cxx), "NLSTM_CPP": "1",
                             "PYTHONPATH": os.pathsep.join(map(str, [*path_first, self.repo]))}

    def start(self, *path_first):
        p = subprocess.Popen([self.python, "-c", BUILD_SCRIPT, str(self.source)], env=self.env(*path_first),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.processes.append(p)
        return p

    def run(self, *path_first) -> tuple[list[str], str]:
        """Build (or load) once in a fresh process; (its two stdout lines, its stderr)."""
        p = self.start(*path_first)
        out, err = p.communicate(timeout=600)  # a guard: a build here takes seconds
        assert p.returncode == 0, err[-3000:]
        return out.split(), err

    def compiles(self) -> list[int]:
        """The pids of the compiles so far (one per compile the wrapper saw)."""
        return [int(x) for x in self.log.read_text().split()] if self.log.exists() else []

    def wait_for_compiles(self, n: int) -> list[int]:
        for _ in range(6000):  # a guard (10 minutes), not a timing
            if len(self.compiles()) >= n:
                return self.compiles()
            time.sleep(0.1)
        raise AssertionError(f"no compile #{n} started")

    def kill(self, pid: int) -> None:
        """Kill a hanging compile (once: its pid may be reused afterwards)."""
        if pid in self.hanging:
            self.hanging.discard(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended by itself
                pass

    def stop_all(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait()
        for pid in list(self.hanging):  # in their own process groups under ninja: not killed with the builder
            self.kill(pid)


@pytest.fixture
def builds(tmp_path):
    if cpp_compiler() is None:
        pytest.skip("no C++ compiler: the C++ loops cannot be built here")
    b = Builds(tmp_path)
    yield b
    b.stop_all()


def test_two_environments_with_the_same_torch_build_once_each(builds, tmp_path):
    """Issue 19: environment B sees torch at another path (as a second venv, or an installed wheel's
    environment, does), so torch writes other include and library paths into the build; sharing one
    folder, each environment's first call rebuilt the other's library (4 compiles for A, B, A, B).
    Keyed on those paths, each environment builds once and then only loads its library."""

    other = tmp_path / "env-b"
    other.mkdir()
    (other / "torch").symlink_to(Path(torch.__file__).parent)
    seen = {}
    for env, path_first in [("a", []), ("b", [other]), ("a", []), ("b", [other])]:
        (include, folder), _ = builds.run(*path_first)
        seen.setdefault(env, set()).add(folder)
        assert include.startswith(str(other if env == "b" else Path(torch.__file__).parent.parent))
    assert len(builds.compiles()) == 2, f"{len(builds.compiles())} compiles for 2 environments"
    assert len(seen["a"]) == len(seen["b"]) == 1 and seen["a"] != seen["b"]


def test_the_build_key_follows_what_torch_builds_with(monkeypatch, tmp_path):
    """The folder changes with torch's include or library paths, the compiler, the source; not otherwise."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("NLSTM_CACHE_DIR", str(tmp_path))
    here = cpp.build_dir()
    assert cpp.build_dir() == here
    real_include, real_lib = cpp_extension.include_paths, cpp_extension.library_paths
    monkeypatch.setattr(cpp_extension, "include_paths", lambda *a, **k: ["/other/env/torch/include"])
    assert cpp.build_dir() != here
    monkeypatch.setattr(cpp_extension, "include_paths", real_include)
    monkeypatch.setattr(cpp_extension, "library_paths", lambda *a, **k: ["/other/env/torch/lib"])
    assert cpp.build_dir() != here
    monkeypatch.setattr(cpp_extension, "library_paths", real_lib)
    monkeypatch.setenv("CXX", "clang++")
    assert cpp.build_dir() != here
    monkeypatch.delenv("CXX")
    assert cpp.build_dir() == here
    assert cpp.build_dir(cpp.BuildKey.current(b"// another source")) != here


def _killed_builder(builds: Builds):
    """A builder hanging inside its compile (holding the build lock and torch's `lock` file), killed there."""
    builds.block.touch()
    holder = builds.start()
    (compile_pid,) = builds.wait_for_compiles(1)
    builds.hanging.add(compile_pid)
    return holder, compile_pid


def test_a_build_killed_midway_is_taken_over_at_once_and_says_so(builds):
    """Issue 20 item 3: the lock file of a builder killed mid-build made every later build wait
    until it was 1800 s old. The next build takes over at once and says whose build it replaces."""

    holder, compile_pid = _killed_builder(builds)
    holder.kill()
    holder.wait()
    builds.kill(compile_pid)
    builds.block.unlink()
    (folder,) = (builds.cache / "torch_extensions").iterdir()
    assert (folder / "lock").exists()  # torch's own lock, left behind
    (_, built), err = builds.run()  # with the stale lock honoured this would wait 30 minutes (past the guard)
    assert built == str(folder) and not (folder / "lock").exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("nlstm:")]
    assert len(lines) == 1 and f"by pid {holder.pid} on {socket.gethostname()}, started" in lines[0], err
    assert "ended without finishing" in lines[0]
    assert len(builds.compiles()) == 2
    builds.run()  # and then it is built: loaded, not compiled again
    assert len(builds.compiles()) == 2


def test_a_build_waiting_for_another_says_for_whom_then_takes_over_when_it_is_killed(builds):
    """A second process never waits silently: one line on stderr names the holder (pid, host, how
    long); when the holder is killed, the waiter builds at once."""

    holder, compile_pid = _killed_builder(builds)
    waiter = builds.start()
    lines: list[str] = []
    said = threading.Event()

    def read():
        for line in waiter.stderr:
            lines.append(line)
            if "waiting for" in line:
                said.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert said.wait(timeout=600), "".join(lines)  # a guard: the line comes as soon as the waiter starts
    waiting = next(ln for ln in lines if "waiting for" in ln)
    assert f"(pid {holder.pid} on {socket.gethostname()}, started " in waiting and " s ago; it holds " in waiting
    assert waiter.poll() is None and len(builds.compiles()) == 1  # it waits; it does not build beside the holder
    builds.block.unlink()
    holder.kill()
    holder.wait()
    builds.kill(compile_pid)
    assert waiter.wait(timeout=600) == 0, "".join(lines)
    reader.join(timeout=60)
    assert any(f"by pid {holder.pid} on" in ln and "ended without finishing" in ln for ln in lines), "".join(lines)
    assert len(builds.compiles()) == 2


def test_a_folder_that_cannot_be_locked_is_said_once_and_built_anyway(monkeypatch, tmp_path):
    """A file system without locks: one line, nothing held (the age rule for torch's lock applies)."""


    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(build_lock.fcntl, "flock", refuse)
    said = []
    with build_lock.BuildLock(tmp_path, say=said.append) as lock:
        assert not lock.locked
    assert len(said) == 1 and "cannot lock" in said[0] and "No locks available" in said[0]
