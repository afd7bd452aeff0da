"""Flush-to-zero around the fused kernel's loops (issue 11: denormals from saturated gates).

The kernel sets FTZ/DAZ on the calling thread and on its OpenMP workers, and puts the previous
setting back. These tests check that the setting reaches the workers, that nothing leaks out, and
that the results (float64, gradients included) equal the reference with the flush on and off.
"""

from __future__ import annotations

import pytest
import torch

import nlstm.fused.function
import nlstm.fused.inference
from nlstm import NestedLSTM
from nlstm.fused.cpp import forward_loop_cpp
from nlstm.fused.cpu_env import FlushDenormals, fenv
from nlstm.fused.forward import forward_loop

needs_fenv = pytest.mark.skipif(not fenv(), reason="no x86 floating-point environment access here")
TIGHT = dict(atol=1e-10, rtol=1e-10)


def halves_flushed(threads: int) -> list[bool]:
    """A parallel multiply whose every result is denormal: is each half (one per thread) zero?"""
    a = torch.full((1 << 21,), 1e-20)  # (1e-20)^2 = 1e-40 < float32's smallest normal 1.2e-38
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = a * a
    finally:
        torch.set_num_threads(old)
    half = y.numel() // 2
    return [bool((y[:half] == 0).all()), bool((y[half:] == 0).all())]


@needs_fenv
def test_flush_reaches_the_openmp_workers_and_is_restored():
    if fenv()[3] is None:
        pytest.skip("torch's thread pool is not libgomp here: only the calling thread is flushed")
    x = torch.zeros(1)
    assert halves_flushed(2) == [False, False]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with FlushDenormals(x):
            inside = halves_flushed(2)
    finally:
        torch.set_num_threads(old)
    assert inside == [True, True]  # torch.set_flush_denormal alone gives [True, False]
    assert halves_flushed(2) == [False, False]


@needs_fenv
@pytest.mark.parametrize("user_setting", [False, True])
def test_a_fused_call_leaves_the_callers_setting_as_it_was(user_setting):
    model = NestedLSTM(3, 4, depth=2)
    x = torch.randn(2, 5, 3, requires_grad=True)
    torch.set_flush_denormal(user_setting)
    try:
        model(x)[0].sum().backward()
        with torch.no_grad():
            model(x)
            model(x[:, :1])
        flushed = torch.tensor([1e-39]).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
    assert flushed == user_setting


def saturated_pair(dtype, scale):
    torch.manual_seed(0)
    fus = NestedLSTM(6, 8, depth=3).to(dtype)
    with torch.no_grad():
        for p in fus.parameters():
            p.mul_(scale)
    ref = NestedLSTM(6, 8, depth=3, impl="reference").to(dtype)
    ref.load_state_dict(fus.state_dict())
    return fus, ref


def outputs_and_grads(model, x):
    out, (h, cs) = model(x)
    loss = out.square().sum() + sum(c.square().sum() for c in cs)
    return [out, h, *cs, *torch.autograd.grad(loss, [x, *model.parameters()])]


@pytest.mark.parametrize("flush", ["1", "0"])
def test_fused_equals_reference_float64_with_and_without_flush(flush, monkeypatch, fused_loops):
    monkeypatch.setenv("NLSTM_FLUSH_DENORMALS", flush)
    fus, ref = saturated_pair(torch.float64, 1.0)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    for a, b in zip(outputs_and_grads(fus, x), outputs_and_grads(ref, x), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    with torch.no_grad():
        for xs in (x, x[:, :1]):
            torch.testing.assert_close(fus(xs)[0], ref(xs)[0], **TIGHT)
    fused_loops.assert_used()


def test_saturated_float32_model_agrees_with_reference(fused_loops):
    """Weights scaled up until gates saturate and denormals appear: the flush changes nothing
    visible (values below 1.2e-38 become zero)."""
    fus, ref = saturated_pair(torch.float32, 40.0)
    x = torch.randn(4, 20, 6, requires_grad=True) * 5
    x = x.detach().requires_grad_()
    for a, b in zip(outputs_and_grads(fus, x), outputs_and_grads(ref, x), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    fused_loops.assert_used()


@pytest.mark.parametrize("serial", ["1", "0", None])
def test_small_widths_run_on_one_thread_only_when_asked_and_restore_the_thread_count(serial, monkeypatch,
                                                                                    fused_loops):
    """With NLSTM_SERIAL_SMALL=1 a call below MAX_SERIAL_STEP_MACS runs at one thread; by default (and
    with 0) at the caller's. Either way, on either loops, the result equals the reference in float64
    and the caller's thread count is kept."""
    if serial is None:
        monkeypatch.delenv("NLSTM_SERIAL_SMALL", raising=False)
    else:
        monkeypatch.setenv("NLSTM_SERIAL_SMALL", serial)
    seen = []

    def spying(loop):
        return lambda *a, **kw: (seen.append(torch.get_num_threads()), loop(*a, **kw))[1]

    for caller in (nlstm.fused.function, nlstm.fused.inference):  # the training and the no-grad path
        monkeypatch.setattr(caller, "forward_loop", spying(forward_loop))
        monkeypatch.setattr(caller, "forward_loop_cpp", spying(forward_loop_cpp))
    fus, ref = saturated_pair(torch.float64, 1.0)
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = outputs_and_grads(fus, x)
        with torch.no_grad():
            fus(x)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert after == 2
    assert seen == ([1, 1] if serial == "1" else [2, 2])
    for a, b in zip(got, outputs_and_grads(ref, x), strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    fused_loops.assert_used()
