"""The C++ time loops (nlstm/csrc/fused_cpu.cpp via nlstm.fused.cpp) against the reference and the
Python loops, and the fallback to the Python loops.

The main fused-vs-reference tests of test_fused.py and test_fused_denormals.py run on both loops
(the ``fused_loops`` fixture); these add widths that leave a remainder after the vectorised part
of each loop, the no-grad path, the oneDNN GEMMs inside C++, and the switches. Tests needing the
library skip when there is no C++ compiler (a fresh install needs none); with a compiler, a
failed build fails them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cpp_compiler
from test_fused import TIGHT, assert_all_close, make_inputs, pair, run

from nlstm.fused import cpp, function
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
