"""The hand-written backward through time, and the gradients computed after it.

The loop keeps only what the forward saved (post-activation gates, memories, each level's GEMM
input, ``s = sigmoid(-2c)``) and per step computes the gate pre-activation gradients:
``[di ; df] = [du ; dr] * [g ; c_prev]`` and ``[dg ; dc_prev] = [du ; dr] * [i ; f]`` are two
multiplies over ``(B, 2, n)`` views, and ``tanh(c) = 1 - 2s``, ``o (1 - tanh(c)^2) = 4 o s (1 - s)``.
The weight gradients come after the loop as one GEMM per level over all steps (stacked gate
gradients (T*B, 4n) against stacked inputs), ``dx`` as one more.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nlstm.fused.buffers import ForwardBuffers, GradBuffers
from nlstm.fused.gemm import gate_perm, mkldnn_ops
from nlstm.fused.weights import PackedWeights, TransposedPacked

__all__ = ["backward_loop", "param_and_input_grads"]


def backward_loop(
    dout: Tensor | None,
    dh_last: Tensor | None,
    dc_last: Sequence[Tensor | None],
    dmem: Sequence[Tensor | None],
    w: PackedWeights,
    buf: ForwardBuffers,
    grads: GradBuffers,
    packed_t: TransposedPacked | None,
) -> list[Tensor]:
    """Back through time. Fills ``grads.dA[k]`` (T, B, 4n) with level k's gate pre-activation
    gradients (torch's gate meaning, kernel order i, f, o, g) and returns the gradients of c0^k
    (views into ``grads``). ``w`` must be unscaled; ``packed_t`` holds the oneDNN-packed
    transposed weights on the mkldnn path (None on the generic path)."""
    dA = grads.dA
    depth = len(dA)
    T, B, n = buf.out.shape
    inner = depth - 1
    mk = packed_t is not None
    zeros, dc, scr, dh_buf, dur = grads.zeros, grads.dc, grads.scr, grads.dh, grads.dur
    gv, v = grads.views, buf.views
    dA_t, d_o, d_g, d_ifo = gv.dA, gv.d_o, gv.d_g, gv.d_ifo
    dc_b, scr_dg, scr_dc = gv.dc_b, gv.scr_dg, gv.scr_dc
    s_t, y_ifo, y_g = v.s, v.ifo, v.g
    # Q^k = o s (1 - s) for all steps at once: dc^k = carry + 4 dh^k Q^k.
    q_t = []
    for k in range(depth):
        torch.ops.aten.sigmoid_backward.grad_input(buf.G[k][:T, :, 2 * n : 3 * n], buf.S[k], grad_input=buf.Q[k])
        q_t.append(v.q[k])
    # Pair views: (B, 2, n) where a (B, 1, n) broadcasts (the innermost level), else (B, 2n) rows.
    pair = [(gv.d_if2[k], v.g_cp2[k], v.i_f2[k], scr[k]) if k == inner
            else (gv.d_if[k], v.g_cp[k], v.i_f[k], gv.scr_flat[k]) for k in range(depth)]
    if mk:
        linear, linear_add, _ = mkldnn_ops()
        ph0t, pcatt = packed_t.wh0, packed_t.wcat
    douts = dout.unbind(0) if dout is not None else None
    dms = [d.unbind(0) if d is not None else None for d in dmem]
    wh0, wcat, tanh_g = w.wh0, w.wcat, w.tanh_g
    mul, addcmul = torch.mul, torch.addcmul
    sig_bw = torch.ops.aten.sigmoid_backward.grad_input
    tanh_bw = torch.ops.aten.tanh_backward.grad_input
    for t in range(T - 1, -1, -1):
        p, pn = t & 1, (t & 1) ^ 1
        # dh_t: the loss's, plus the recurrence into step t+1 (or the final state's gradient).
        if t == T - 1:
            parts = [d for d in (douts[t] if douts is not None else None, dh_last) if d is not None]
            dh = parts[0] + parts[1] if len(parts) == 2 else parts[0] if parts else zeros
        elif mk:
            if douts is not None:
                dh = linear_add(dA_t[0][t + 1], douts[t], ph0t, None, "add")
            else:
                dh = linear(dA_t[0][t + 1], ph0t, None, "none", [], "")
        else:
            dh = dh_buf
            if douts is not None:
                torch.addmm(douts[t], dA_t[0][t + 1], wh0, out=dh)
            else:
                torch.mm(dA_t[0][t + 1], wh0, out=dh)
        # Outer to inner: d o^k = dh^k tanh(c^k) and the memory's gradient dc^k (= dh^{k+1}).
        dhk = dh
        for k in range(depth):
            addcmul(dhk, dhk, s_t[k][t], value=-2.0, out=d_o[k][t])
            c_in = scr_dc[k][pn] if t < T - 1 else dc_last[k]
            addcmul(zeros if c_in is None else c_in, dhk, q_t[k][t], value=4.0, out=dc[k])
            if dms[k] is not None:
                dc[k].add_(dms[k][t])
            dhk = dc[k]
        # Inner to outer: the gates. Level k feeds level k+1 with [u ; r] = [i g ; f c_prev].
        for k in range(inner, -1, -1):
            if k == inner:  # c = f c_prev + i g: d[u ; r] is dc twice
                d_in = dc_b[k]
            elif mk:
                d_in = linear(dA_t[k + 1][t], pcatt[k + 1], None, "none", [], "")
            else:
                d_in = torch.mm(dA_t[k + 1][t], wcat[k + 1], out=dur)
            d_if, g_cp, i_f, scr_k = pair[k]
            mul(d_in, g_cp[t], out=d_if[t])  # [di ; df] = [du g ; dr c_prev]
            mul(d_in, i_f[t], out=scr_k[p])  # [dg ; dc_prev] = [du i ; dr f]
            sig_bw(d_ifo[k][t], y_ifo[k][t], grad_input=d_ifo[k][t])
            if tanh_g[k]:
                tanh_bw(scr_dg[k][p], y_g[k][t], grad_input=d_g[k][t])
            else:
                d_g[k][t].copy_(scr_dg[k][p])
    return [scr_dc[k][0] for k in range(depth)]


def param_and_input_grads(needs: Sequence[bool], x: Tensor, h0: Tensor, out: Tensor, w: PackedWeights,
                          dA: list[Tensor], UR: list[Tensor | None]):
    """After the loop: dx, dh0 (if ``needs``) and the weight gradients, each one GEMM over all
    steps, rows back in torch's i, f, g, o order. ``w`` unscaled."""
    depth = len(dA)
    T, B, n = out.shape
    m = x.shape[2]
    flat = [dA[k].view(T * B, 4 * n) for k in range(depth)]
    dx = None
    if needs[0]:  # oneDNN's GEMM beats torch.mm (MKL) here, with the weight as it is
        dx = mkldnn_ops()[0](flat[0], w.wx0.t().contiguous(), None, "none", [], "") if w.mkldnn else None
        dx = (torch.mm(flat[0], w.wx0) if dx is None else dx).view(T, B, m)
    dh0 = torch.mm(dA[0][0], w.wh0) if needs[1] else None
    ones = out.new_ones(T * B)
    perm = gate_perm(n, out.device)
    dw0x = torch.mm(flat[0].t(), x.reshape(T * B, m))
    dw0h = torch.mm(dA[0][0].t(), h0)
    if T > 1:
        dw0h.addmm_(flat[0][B:].t(), out[:-1].reshape((T - 1) * B, n))
    dw_ih = [dw0x.index_select(0, perm)]
    dw_hh = [dw0h.index_select(0, perm)]
    db = [torch.mv(flat[0].t(), ones).index_select(0, perm)]  # faster than .sum(0)
    for k in range(1, depth):
        dwc = torch.mm(flat[k].t(), UR[k].view(T * B, 2 * n)).index_select(0, perm)  # type: ignore[union-attr]
        dw_ih.append(dwc[:, :n].contiguous())
        dw_hh.append(dwc[:, n:].contiguous())
        db.append(torch.mv(flat[k].t(), ones).index_select(0, perm))
    return dx, dh0, dw_ih, dw_hh, db
