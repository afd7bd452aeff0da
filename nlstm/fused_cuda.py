"""CUDA extras for :mod:`nlstm.fused`: the forward and backward time loops captured as CUDA graphs.

On a GPU the fused kernel's per-step work is a few dozen small kernels, so launching them from
Python (a few microseconds each) rather than the GPU bounds the speed. Capturing each loop once as
a CUDA graph and replaying it removes that: one launch per direction per call.

How it stays correct:

- A graph replays fixed addresses, so each shape (T, B, sizes, depth, dtype, device, candidate,
  memories) gets a :class:`_Runner` with static input, weight, work and gradient buffers; a call
  copies its inputs and prepared weights in, replays, and copies the results out. What the caller
  gets (outputs, memories, gradients) is always fresh tensors.
- The static work buffers hold the forward's saved activations until that call's backward. If
  another forward of the same shape comes first, the earlier call's activations are copied out
  ("evicted") and its backward then runs eagerly from the copy, so any order of calls is right.
  A retained graph whose buffers were reused after its first backward raises instead of
  computing a wrong gradient (as on the CPU path).
- Capture follows the documented recipe: warm-up on a side stream, then ``torch.cuda.graph``,
  both graphs of a runner sharing one memory pool. Runners are cached (at most ``MAX_RUNNERS``).

Off by default: it has not been measured on a GPU yet (the project's machines had none), so it is
opt-in with ``NLSTM_CUDA_GRAPHS=1``; ``tests/test_fused.py::test_cuda_graphs_equal_eager`` checks
it against the eager path on the first machine with a GPU. Mixed precision: under autocast the
fused core runs in float32 (see :func:`nlstm.fused.fused_nested_lstm`); bf16 was not enabled
because its accuracy over long sequences could not be validated here.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
from torch import Tensor

from nlstm.fused.backward import backward_loop, param_and_input_grads
from nlstm.fused.buffers import ForwardBuffers, allocate_forward, allocate_grads
from nlstm.fused.forward import forward_loop
from nlstm.fused.function import FusedNestedLSTMFunction
from nlstm.fused.inputs import check_inputs, split_inputs
from nlstm.fused.weights import PackedWeights, prepare_weights

__all__ = [
    "ENV",
    "MAX_RUNNERS",
    "GraphedFusedNestedLSTMFunction",
    "apply",
    "clear_graphs",
    "graph_cache_size",
    "graphs_enabled",
]

ENV = "NLSTM_CUDA_GRAPHS"
MAX_RUNNERS = 4
_RUNNERS: OrderedDict[tuple, _Runner] = OrderedDict()
_LOCK = threading.Lock()


def graphs_enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def graph_cache_size() -> int:
    return len(_RUNNERS)


def clear_graphs() -> None:
    with _LOCK:
        _RUNNERS.clear()


def apply(depth: int, outer_identity: bool, return_memories: bool, tensors: tuple[Tensor, ...]):
    """Entry point of :func:`nlstm.fused.fused_nested_lstm` for CUDA tensors that need gradients."""
    if graphs_enabled():
        return GraphedFusedNestedLSTMFunction.apply(depth, outer_identity, return_memories, *tensors)
    return FusedNestedLSTMFunction.apply(depth, outer_identity, return_memories, *tensors)


def _copy_weights(dst: PackedWeights, src: PackedWeights) -> None:
    dst.wx0.copy_(src.wx0)
    dst.wh0.copy_(src.wh0)
    dst.b0.copy_(src.b0)
    for k in range(1, len(dst.tanh_g)):
        dst.wcat[k].copy_(src.wcat[k])  # type: ignore[union-attr]
        dst.bk[k].copy_(src.bk[k])  # type: ignore[union-attr]


def _clone_work(buf: ForwardBuffers) -> ForwardBuffers:
    """The saved activations of one call (not its output, which the caller owns)."""
    copy = ForwardBuffers(
        G=[g.clone() for g in buf.G],
        UR=[u.clone() if u is not None else None for u in buf.UR],
        S=[s.clone() for s in buf.S],
        Q=[q.clone() for q in buf.Q] if buf.Q is not None else None,
        scratch=buf.scratch,
        one=buf.one,
        minus_two=buf.minus_two,
        out=buf.out,
    )
    copy.make_views()
    return copy


class _Holder:
    """One forward call's claim on its runner's static buffers."""

    def __init__(self, runner: _Runner, generation: int) -> None:
        self.runner, self.generation = runner, generation
        self.private: ForwardBuffers | None = None  # set when evicted from the static buffers
        self.backward_done = False


class _Runner:
    def __init__(self, key: tuple, x: Tensor, depth: int, outer_identity: bool, return_memories: bool,
                 w_ih, w_hh, b) -> None:
        T, B, m = x.shape
        n = w_hh[0].shape[1]
        self.key, self.depth, self.return_memories = key, depth, return_memories
        kw = dict(dtype=x.dtype, device=x.device)
        self.x = torch.empty(T, B, m, **kw)
        self.h0 = torch.empty(B, n, **kw)
        self.c0 = [torch.empty(B, n, **kw) for _ in range(depth)]
        self.w = prepare_weights(w_ih, w_hh, b, outer_identity, False, B)  # static, scaled (forward)
        self.wb = prepare_weights(w_ih, w_hh, b, outer_identity, False, B)  # static, unscaled (backward)
        self.wb.unscale()
        self.buf = allocate_forward(T, B, n, depth, x, train=True)
        self.dout = torch.zeros(T, B, n, **kw)
        self.dh_last = torch.zeros(B, n, **kw)
        self.dc_last = [torch.zeros(B, n, **kw) for _ in range(depth)]
        self.dmem = [torch.zeros(T, B, n, **kw) for _ in range(depth)] if return_memories else [None] * depth
        self.grads = allocate_grads(T, B, n, depth, x)
        self.dA = self.grads.dA
        self.pool = torch.cuda.graph_pool_handle()
        self.fwd_graph: torch.cuda.CUDAGraph | None = None
        self.bwd_graph: torch.cuda.CUDAGraph | None = None
        self.dc0: list[Tensor] = []
        self.generation = 0
        self.holder: _Holder | None = None

    def _capture(self, fn) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: cuBLAS handles, workspaces, lazy initialisation
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph

    def _run_forward(self) -> None:
        forward_loop(self.x, self.h0, self.c0, self.w, self.buf)

    def _run_backward(self) -> None:
        self.dc0 = backward_loop(self.dout, self.dh_last, self.dc_last, self.dmem, self.wb, self.buf, self.grads, None)

    def forward(self, x, h0, c0, w: PackedWeights) -> _Holder:
        if self.holder is not None and not self.holder.backward_done and self.holder.private is None:
            self.holder.private = _clone_work(self.buf)  # evict the earlier call's activations
        self.x.copy_(x)
        self.h0.copy_(h0)
        for dst, src in zip(self.c0, c0, strict=True):
            dst.copy_(src)
        _copy_weights(self.w, w)
        if self.fwd_graph is None:
            self.fwd_graph = self._capture(self._run_forward)
        self.fwd_graph.replay()
        self.generation += 1
        self.holder = _Holder(self, self.generation)
        return self.holder

    def backward(self, holder: _Holder, w_unscaled: PackedWeights, dout, dh_last, dc_last, dmem):
        """Fills self.dA and returns the gradients of c0 (fresh); None if this holder was evicted."""
        if holder.private is not None:
            return None
        if holder.generation != self.generation:
            raise RuntimeError(
                "the fused Nested LSTM's CUDA-graph buffers were reused by a later call after this "
                "graph's first backward; run backward once per forward"
            )
        for dst, src in ((self.dout, dout), (self.dh_last, dh_last), *zip(self.dc_last, dc_last, strict=True)):
            dst.copy_(src) if src is not None else dst.zero_()
        if self.return_memories:
            for dst, src in zip(self.dmem, dmem, strict=True):
                dst.copy_(src) if src is not None else dst.zero_()
        _copy_weights(self.wb, w_unscaled)
        if self.bwd_graph is None:
            self.bwd_graph = self._capture(self._run_backward)
        self.bwd_graph.replay()
        holder.backward_done = True
        return [d.clone() for d in self.dc0]


def _runner(key: tuple, make) -> _Runner:
    with _LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            runner = _RUNNERS[key] = make()
            while len(_RUNNERS) > MAX_RUNNERS:
                _RUNNERS.popitem(last=False)
        else:
            _RUNNERS.move_to_end(key)
        return runner


class GraphedFusedNestedLSTMFunction(torch.autograd.Function):
    """:class:`nlstm.fused.FusedNestedLSTMFunction` with both time loops replayed as CUDA graphs."""

    @staticmethod
    def forward(ctx, depth: int, outer_identity: bool, return_memories: bool, *tensors: Tensor):
        x, h0, c0, w_ih, w_hh, b = split_inputs(depth, tensors)
        check_inputs(x, h0, c0, w_ih, w_hh, b)
        T, B, m = x.shape
        n = h0.shape[1]
        key = (T, B, m, n, depth, outer_identity, return_memories, x.dtype, x.device)
        runner = _runner(key, lambda: _Runner(key, x, depth, outer_identity, return_memories, w_ih, w_hh, b))
        w = prepare_weights(w_ih, w_hh, b, outer_identity, False, B)
        holder = runner.forward(x, h0, c0, w)
        buf = runner.buf
        out = buf.out.clone()
        ctx.depth, ctx.return_memories, ctx.w, ctx.holder = depth, return_memories, w, holder
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, out)
        c_last = [buf.G[k][T, :, 4 * n :].clone() for k in range(depth)]
        mems = [buf.G[k][1:, :, 4 * n :].clone() for k in range(depth)] if return_memories else []
        return (out, out[T - 1].clone(), *c_last, *mems)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dh_last, *rest):
        depth = ctx.depth
        x, h0, out = ctx.saved_tensors
        w, holder = ctx.w, ctx.holder
        runner = holder.runner
        dc_last = rest[:depth]
        dmem = rest[depth:] if ctx.return_memories else [None] * depth
        T, B, n = out.shape
        w.unscale()
        dc0 = runner.backward(holder, w, dout, dh_last, dc_last, dmem)
        if dc0 is None:  # evicted: the eager loop on this call's private copy of the activations
            buf = holder.private
            grads = allocate_grads(T, B, n, depth, out)
            dA = grads.dA
            if dout is not None and not dout.is_contiguous():
                dout = dout.contiguous()
            dc0 = [d.clone() for d in backward_loop(dout, dh_last, dc_last, dmem, w, buf, grads, None)]
        else:
            buf, dA = runner.buf, runner.dA
        dx, dh0, dw_ih, dw_hh, db = param_and_input_grads(ctx.needs_input_grad[3:5], x, h0, out, w, dA, buf.UR)
        dc0 = [dc0[k] if ctx.needs_input_grad[5 + k] else None for k in range(depth)]
        return (None, None, None, dx, dh0, *dc0, *dw_ih, *dw_hh, *db)
