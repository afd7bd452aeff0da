"""The weights in the kernel's layout, prepared once per call from the parameters as they are.

Rows are reordered to i, f, o, g (one ``sigmoid_`` then covers i, f, o), level k >= 1's two
matrices are concatenated into one ``[W_ih W_hh]`` (one GEMM per level per step), and where g is
a tanh its rows are multiplied by -2 (exact), so that one sigmoid over all four gates gives
s = sigmoid(-2z) and then g = tanh(z) = 1 - 2s. Nothing is cached between calls: preparing costs
about as much as checking a cached copy against the parameters would (docs/benchmarks.md), and
a call can never see stale weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nlstm.fused.gemm import gate_perm, mkldnn_ops

__all__ = ["PackedWeights", "TransposedPacked", "g_is_tanh", "pack_transposed", "prepare_weights"]


def g_is_tanh(level: int, depth: int, outer_identity: bool) -> bool:
    """Whether level ``level``'s candidate g goes through tanh (the reference's rule)."""
    return not (level == 0 and depth > 1 and outer_identity)


@dataclass
class PackedWeights:
    """The weights in the kernel's layout: rows i, f, o, g; level k >= 1 as one [W_ih W_hh]."""

    wx0: Tensor  # (4n, in)
    wh0: Tensor  # (4n, n)
    b0: Tensor  # (4n,)
    wcat: list[Tensor | None]  # level k >= 1: (4n, 2n); index k (None at 0)
    bk: list[Tensor | None]  # level k >= 1: (4n,)
    tanh_g: list[bool]  # per level: whether g is a tanh (and its rows are scaled)
    mkldnn: bool  # whether the oneDNN-packed copies below exist
    ph0: Tensor | None = None  # packed wh0, wcat (forward, scaled)
    pcat: list[Tensor | None] = field(default_factory=list)
    scaled: bool = True  # False once unscale() ran: the backward needs the plain weights

    def unscale(self) -> None:
        """Undo the scaling of the g rows (exact: multiplying by -2 and by -0.5 loses nothing)."""
        if not self.scaled:
            return
        n = self.wh0.shape[1]
        if self.tanh_g[0]:
            for w in (self.wx0, self.wh0, self.b0):
                w[3 * n :].mul_(-0.5)
        for k in range(1, len(self.tanh_g)):
            self.wcat[k][3 * n :].mul_(-0.5)  # type: ignore[index]
            self.bk[k][3 * n :].mul_(-0.5)  # type: ignore[index]
        self.scaled = False


def prepare_weights(
    weights_ih: Sequence[Tensor],
    weights_hh: Sequence[Tensor],
    biases: Sequence[Tensor],
    outer_identity: bool,
    mkldnn: bool,
    batch: int,
) -> PackedWeights:
    """Fresh copies of the parameters in the kernel's layout (scaled), oneDNN-packed if ``mkldnn``."""
    depth = len(weights_ih)
    n = weights_hh[0].shape[1]
    perm = gate_perm(n, weights_hh[0].device)
    wx0 = weights_ih[0].detach().index_select(0, perm)
    wh0 = weights_hh[0].detach().index_select(0, perm)
    b0 = biases[0].detach().index_select(0, perm)
    wcat: list[Tensor | None] = [None]
    bk: list[Tensor | None] = [None]
    for k in range(1, depth):
        wcat.append(torch.cat([weights_ih[k].detach(), weights_hh[k].detach()], 1).index_select(0, perm))
        bk.append(biases[k].detach().index_select(0, perm))
    tanh_g = [g_is_tanh(k, depth, outer_identity) for k in range(depth)]
    if tanh_g[0]:
        for w in (wx0, wh0, b0):
            w[3 * n :].mul_(-2.0)
    for k in range(1, depth):
        wcat[k][3 * n :].mul_(-2.0)  # type: ignore[index]
        bk[k][3 * n :].mul_(-2.0)  # type: ignore[index]
    w = PackedWeights(wx0, wh0, b0, wcat, bk, tanh_g, mkldnn)
    if mkldnn:
        pack = mkldnn_ops()[2]
        w.ph0 = pack(wh0, batch)  # the hoisted GEMM takes wx0 as it is (packing it does not pay)
        w.pcat = [None] + [pack(wcat[k], batch) for k in range(1, depth)]
    return w


@dataclass
class TransposedPacked:
    """The backward's oneDNN-packed transposed step weights (from unscaled weights)."""

    wh0: Tensor  # packed wh0^T
    wcat: list[Tensor | None]  # level k >= 1: packed wcat^T; None at 0


def pack_transposed(w: PackedWeights, batch: int) -> TransposedPacked:
    """Pack the transposed step weights for the backward loop's oneDNN GEMMs (``w`` unscaled)."""
    pack = mkldnn_ops()[2]
    return TransposedPacked(
        wh0=pack(w.wh0.t().contiguous(), batch),
        wcat=[None] + [pack(w.wcat[k].t().contiguous(), batch) for k in range(1, len(w.tanh_g))],  # type: ignore[union-attr]
    )
