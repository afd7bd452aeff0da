"""The forward time loop: one GEMM per level per step, the element-wise work in place.

Level k's buffer row at step t is ``[i, f, o, g | c^k_{t-1}]``: one ``sigmoid`` covers i, f, o
(and g where its weight rows were scaled by -2, since ``tanh(z) = 1 - 2 sigmoid(-2z)``, torch's
CPU ``tanh`` being ~3x slower than its ``sigmoid``), and ``[u ; r] = [i ; f] * [g ; c_prev]`` is
one multiply over ``(B, 2, n)`` views. The outputs are ``o tanh(c) = o - 2 o s`` with
``s = sigmoid(-2c)``, which the backward reuses. The new memory goes to row t+1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nlstm.fused.buffers import ForwardBuffers
from nlstm.fused.gemm import mkldnn_ops
from nlstm.fused.weights import PackedWeights

__all__ = ["forward_loop"]


def forward_loop(x: Tensor, h0: Tensor, c0: Sequence[Tensor], w: PackedWeights, buf: ForwardBuffers) -> None:
    """Run the sequence (x time-major (T, B, in)) into ``buf``; call under no_grad."""
    T, B, m = x.shape
    n = h0.shape[1]
    depth = len(c0)
    inner = depth - 1
    mk = w.mkldnn
    G = buf.G
    for k in range(depth):
        G[k][0, :, 4 * n :].copy_(c0[k])
    x2d = x.reshape(T * B, m)
    if mk:
        linear, linear_add, _ = mkldnn_ops()
        xp = linear(x2d, w.wx0, w.b0, "none", [], "").view(T, B, 4 * n).unbind(0)
    else:  # the hoisted input projection goes straight into the gate columns
        torch.addmm(w.b0, x2d, w.wx0.t(), out=G[0][:T].view(T * B, 5 * n)[:, : 4 * n])
    v = buf.views
    gates, g_col, o_col, i_f, g_cp, c_new = v.gates, v.g, v.o, v.i_f, v.g_cp, v.c_new
    sig = [gates[k] if w.tanh_g[k] else v.ifo[k] for k in range(depth)]
    outs = buf.out.unbind(0)
    h_prev = (h0, *outs[:-1])
    h_dest = [outs] + c_new[:-1]  # h^k is the output (k = 0) or the memory c^{k-1}
    s_t, ur = v.s, v.ur
    scratch = v.scratch
    ig, fc = v.ig_fc
    wh0t = w.wh0.t()
    wcatt = [None] + [wc.t() for wc in w.wcat[1:]]
    tanh_g, bk, pcat = w.tanh_g, w.bk, w.pcat
    one, minus_two = buf.one, buf.minus_two
    mul, add, addcmul, sigmoid = torch.mul, torch.add, torch.addcmul, torch.sigmoid
    split_ifo_g = [3 * n, n]
    for t in range(T):
        for k in range(depth):
            # Level k's GEMM into its gate columns, then the activations in place.
            if mk:
                if k == 0:
                    a = linear_add(h_prev[t], xp[t], w.ph0, None, "add")
                else:
                    a = linear(ur[k][t], pcat[k], bk[k], "none", [], "")
                if tanh_g[k]:
                    sigmoid(a, out=gates[k][t])
                else:  # identity g: the sigmoid of i, f, o goes straight to the buffer, g is copied
                    a_ifo, a_g = a.split(split_ifo_g, 1)
                    sigmoid(a_ifo, out=sig[k][t])
                    g_col[k][t].copy_(a_g)
            else:
                if k == 0:
                    gates[0][t].addmm_(h_prev[t], wh0t)
                else:
                    torch.addmm(bk[k], ur[k][t], wcatt[k], out=gates[k][t])
                sig[k][t].sigmoid_()
            if tanh_g[k]:  # g = tanh(z) = 1 - 2 sigmoid(-2z)
                add(one, g_col[k][t], alpha=-2.0, out=g_col[k][t])
            if k < inner:  # the next level's [u ; r] = [i ; f] * [g ; c_prev]
                mul(i_f[k][t], g_cp[k][t], out=ur[k + 1][t])
            else:  # the innermost memory: f c_prev + i g
                mul(i_f[k][t], g_cp[k][t], out=scratch)
                add(ig, fc, out=c_new[k][t])
        for k in range(inner, -1, -1):  # h^k = o tanh(c^k) = o - 2 o sigmoid(-2 c^k)
            s = s_t[k][t]
            mul(c_new[k][t], minus_two, out=s)
            s.sigmoid_()
            o = o_col[k][t]
            addcmul(o, o, s, value=-2.0, out=h_dest[k][t])
