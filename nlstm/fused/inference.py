"""Inference (grad mode off, or nothing requires grad): the forward alone, and a lighter single step.

Nothing here is cached across calls except pooled scratch memory: every call reads the weights as
they are now (an optimizer step of any kind, a write through ``p.data``, ``load_state_dict`` or
``set_`` is always seen), and every call works in buffers leased to it alone, so any number of
threads may run one model at once. Preparing (reordering, packing) the weights per call costs
about as much as checking a cached copy against them would (both read all weights; measured in
docs/benchmarks.md): ~1 % of a whole-sequence call, and single steps skip preparation entirely.
"""

from __future__ import annotations

import torch

from nlstm.fused.buffers import lease_forward, lease_step
from nlstm.fused.cpp import forward_loop_cpp, onednn_in_cpp, use_cpp
from nlstm.fused.cpu_env import FlushDenormals, threads_for
from nlstm.fused.forward import forward_loop
from nlstm.fused.gemm import gemm_backend
from nlstm.fused.inputs import check_inputs
from nlstm.fused.weights import g_is_tanh, prepare_weights

__all__ = ["MIN_PACKED_STEPS", "inference", "inference_step"]

MIN_PACKED_STEPS = 16  # no-grad calls shorter than this use the generic GEMMs (no packing)


@torch.no_grad()
def inference_step(x, h0, c0, w_ih, w_hh, b, outer_identity):
    """One step (T = 1, what generation makes after its prompt) straight from the parameters.

    The whole-sequence kernel's layout (reordered rows, scaled tanh rows, concatenated level
    weights) pays for itself over many steps; for one step, preparing it would cost as much as the
    step. So this runs :func:`nlstm.cell.nested_lstm_step`'s arithmetic on the weights as they are,
    in leased scratch buffers: it allocates only its outputs (h and the D new memories)."""
    _, B, _ = x.shape
    n, depth = h0.shape[1], len(c0)
    inner = depth - 1
    lease = lease_step(B, n, depth, x)
    s = lease.item
    out = x.new_empty(1, B, n)
    c_new = [x.new_empty(B, n) for _ in range(depth)]
    u, r = x[0], h0
    gates = []
    for k in range(depth):
        a = s.A[k]
        torch.addmm(b[k], u, w_ih[k].t(), out=a)
        a.addmm_(r, w_hh[k].t())
        i, f, g, o = a.chunk(4, 1)
        a[:, : 2 * n].sigmoid_()
        o.sigmoid_()
        if g_is_tanh(k, depth, outer_identity):
            g.tanh_()
        gates.append((i, f, g, o))
        if k < inner:  # the next level's input u = i g and "previous hidden" r = f c_prev
            u, r = torch.mul(i, g, out=s.U[k + 1]), torch.mul(f, c0[k], out=s.R[k + 1])
    i, f, g, o = gates[inner]
    torch.mul(i, g, out=s.th)
    torch.addcmul(s.th, f, c0[inner], out=c_new[inner])  # the innermost memory: f c_prev + i g
    for k in range(inner, -1, -1):  # h^k = o tanh(c^k); h^k is the memory c^{k-1} (or the output)
        dest = out[0] if k == 0 else c_new[k - 1]
        torch.tanh(c_new[k], out=s.th)
        torch.mul(gates[k][3], s.th, out=dest)
    lease.release()
    return out, (out[0], tuple(c_new))


@torch.no_grad()
def inference(x, h0, c0, w_ih, w_hh, b, outer_identity, return_memories):
    """The forward without the helpers the backward needs: ``(out, (h_T, c_T), memories or None)``."""
    check_inputs(x, h0, c0, w_ih, w_hh, b)
    T, B, _ = x.shape
    n, depth = h0.shape[1], len(c0)
    if T == 1:
        with threads_for(B, n), FlushDenormals(x, workers=False):
            out, state = inference_step(x, h0, c0, w_ih, w_hh, b, outer_identity)
        return out, state, (tuple(c.unsqueeze(0).clone() for c in state[1]) if return_memories else None)
    # Packing the step weights for oneDNN (~0.5 ms quiet, tens of ms when other processes hold the
    # cores: the reorder is a parallel region) pays over a long sequence, not over a few steps.
    ops = use_cpp(x)
    mk = T >= MIN_PACKED_STEPS and gemm_backend(x) == "mkldnn" and (ops is None or onednn_in_cpp(B, n))
    with threads_for(B, n), FlushDenormals(x):
        w = prepare_weights(w_ih, w_hh, b, outer_identity, mk, B)
        lease = lease_forward(T, B, n, depth, x, train=False)  # its out is a fresh tensor
        buf = lease.item
        if ops is not None:
            forward_loop_cpp(ops, x, h0, c0, w, buf, train=False)
        else:
            forward_loop(x, h0, c0, w, buf)
    out = buf.out
    c_last = tuple(buf.G[k][T, :, 4 * n :].clone() for k in range(depth))
    mems = tuple(buf.G[k][1:, :, 4 * n :].clone() for k in range(depth)) if return_memories else None
    lease.release()
    return out, (out[T - 1], c_last), mems
