"""The autograd Function over the two loops, and :func:`fused_nested_lstm`, the entry the model calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nlstm.fused.backward import backward_loop, param_and_input_grads
from nlstm.fused.buffers import lease_forward, lease_grads
from nlstm.fused.cpp import backward_loop_cpp, forward_loop_cpp, onednn_in_cpp, use_cpp
from nlstm.fused.cpu_env import FlushDenormals, threads_for
from nlstm.fused.forward import forward_loop
from nlstm.fused.gemm import gemm_backend
from nlstm.fused.inference import inference
from nlstm.fused.inputs import check_inputs, split_inputs
from nlstm.fused.weights import pack_transposed, prepare_weights

__all__ = ["FusedNestedLSTMFunction", "fused_nested_lstm"]


class FusedNestedLSTMFunction(torch.autograd.Function):
    """``apply(depth, outer_identity, return_memories, x, h0, *c0, *w_ih, *w_hh, *b)`` ->
    ``(out, h_T, *c_T, *memories)``: x time-major (T, B, in); memories only if asked for.
    Not twice differentiable."""

    @staticmethod
    def forward(ctx, depth: int, outer_identity: bool, return_memories: bool, *tensors: Tensor):
        x, h0, c0, w_ih, w_hh, b = split_inputs(depth, tensors)
        check_inputs(x, h0, c0, w_ih, w_hh, b)
        T, B, _ = x.shape
        n = h0.shape[1]
        ops = use_cpp(x)
        mk = gemm_backend(x) == "mkldnn" and (ops is None or onednn_in_cpp(B, n))
        with threads_for(B, n), FlushDenormals(x):
            w = prepare_weights(w_ih, w_hh, b, outer_identity, mk, B)
            lease = lease_forward(T, B, n, depth, x, train=True)
            buf = lease.item
            if ops is not None:
                forward_loop_cpp(ops, x, h0, c0, w, buf, train=True)
            else:
                forward_loop(x, h0, c0, w, buf)
        w.ph0 = None  # the forward's packed weights are not needed any more
        w.pcat = []
        ctx.depth, ctx.return_memories, ctx.ops = depth, return_memories, ops
        ctx.w, ctx.buf, ctx.lease, ctx.generation = w, buf, lease, buf.generation
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, buf.out)  # out is an output: autograd checks it is not modified
        c_last = [buf.G[k][T, :, 4 * n :].clone() for k in range(depth)]
        mems = [buf.G[k][1:, :, 4 * n :].clone() for k in range(depth)] if return_memories else []
        return (buf.out, buf.out[T - 1].clone(), *c_last, *mems)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dh_last, *rest):
        depth = ctx.depth
        x, h0, out = ctx.saved_tensors
        w, buf = ctx.w, ctx.buf
        if buf.generation != ctx.generation:
            raise RuntimeError(
                "the fused Nested LSTM's saved buffers were reused by a later call after this graph's "
                "first backward; run backward once per forward (or retain_graph without forward calls "
                "in between)"
            )
        dc_last = rest[:depth]
        dmem = rest[depth:] if ctx.return_memories else [None] * depth
        T, B, n = out.shape
        if dout is not None and not dout.is_contiguous():
            dout = dout.contiguous()
        with threads_for(B, n), FlushDenormals(x):
            w.unscale()
            packed_t = pack_transposed(w, B) if w.mkldnn else None
            da_lease = lease_grads(T, B, n, depth, out)
            dA = da_lease.item.dA
            if ctx.ops is not None:
                dc0 = backward_loop_cpp(ctx.ops, dout, dh_last, dc_last, dmem, w, buf, da_lease.item, packed_t)
            else:
                dc0 = backward_loop(dout, dh_last, dc_last, dmem, w, buf, da_lease.item, packed_t)
            dx, dh0, dw_ih, dw_hh, db = param_and_input_grads(ctx.needs_input_grad[3:5], x, h0, out, w, dA,
                                                              buf.UR)
        dc0 = [dc0[k].clone() if ctx.needs_input_grad[5 + k] else None for k in range(depth)]
        da_lease.release()
        ctx.lease.release()  # buffers back to the pool; a retained graph's next backward checks generation
        return (None, None, None, dx, dh0, *dc0, *dw_ih, *dw_hh, *db)


def fused_nested_lstm(
    x_tm: Tensor,
    state: tuple[Tensor, Sequence[Tensor]],
    weights_ih: Sequence[Tensor],
    weights_hh: Sequence[Tensor],
    biases: Sequence[Tensor],
    outer_candidate: str = "identity",
    return_memories: bool = False,
) -> tuple[Tensor, tuple[Tensor, tuple[Tensor, ...]], tuple[Tensor, ...] | None]:
    """The Nested LSTM over a time-major sequence ``x_tm`` (T, B, in) from ``state = (h0, (c0^0, ...))``.

    Returns ``(out (T, B, n), (h_T, (c^0_T, ...)), memories)``; ``memories`` is a tuple of D
    (T, B, n) traces of c^k with ``return_memories``, else None. Gradients reach x, the state and
    every weight. Calls share no state: any number of threads may run one set of weights at once."""
    depth = len(weights_ih)
    if outer_candidate not in ("identity", "tanh"):
        raise ValueError(f"outer_candidate must be 'identity' or 'tanh', got {outer_candidate!r}")
    h0, c0 = state
    c0 = tuple(c0)
    if len(c0) != depth:
        raise ValueError(f"expected {depth} memories in the state, got {len(c0)}")
    tensors = (x_tm, h0, *c0, *weights_ih, *weights_hh, *biases)
    device_type = x_tm.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast the core runs in its weights' precision (float32 for a float32 model):
        # the recurrence carries c through T steps, and bf16/fp16 kernels were not validated.
        dtype = weights_ih[0].dtype
        with torch.autocast(device_type, enabled=False):
            return fused_nested_lstm(
                x_tm.to(dtype), (h0.to(dtype), tuple(c.to(dtype) for c in c0)), weights_ih, weights_hh,
                biases, outer_candidate, return_memories,
            )
    outer_identity = outer_candidate == "identity"
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return inference(x_tm, h0, c0, weights_ih, weights_hh, biases, outer_identity, return_memories)
    if x_tm.device.type == "cuda":
        from nlstm import fused_cuda  # GPU-only extras, imported only here

        res = fused_cuda.apply(depth, outer_identity, return_memories, tensors)
    else:
        res = FusedNestedLSTMFunction.apply(depth, outer_identity, return_memories, *tensors)
    out, h_last, c_last = res[0], res[1], tuple(res[2 : 2 + depth])
    mems = tuple(res[2 + depth :]) if return_memories else None
    return out, (h_last, c_last), mems
