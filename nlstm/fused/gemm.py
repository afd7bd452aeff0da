"""The per-step GEMM backends: oneDNN's prepacked small-batch GEMM or ``torch.addmm``.

With the step weights reordered ("prepacked") once per call, oneDNN's small-batch GEMM runs the
per-step products about 1.4x faster than the MKL ``addmm`` behind ``torch.mm`` on this AMD CPU
(float32). Elsewhere (float64, CUDA, no oneDNN) the loops run ``torch.addmm(out=)``;
``NLSTM_FUSED_GEMM=generic`` forces that path.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

__all__ = ["GEMM_BACKENDS", "gate_perm", "gemm_backend", "mkldnn_ops"]

GEMM_BACKENDS = ("auto", "mkldnn", "generic")

_MKLDNN_OPS: tuple | None | bool = None


def mkldnn_ops():
    """(linear, linear_add, pack) from oneDNN, or False where this torch build lacks them."""
    global _MKLDNN_OPS
    if _MKLDNN_OPS is None:
        try:
            ops = torch.ops.mkldnn
            linear = ops._linear_pointwise.default
            linear_add = ops._linear_pointwise.binary
            pack = ops._reorder_linear_weight.default
            x, w = torch.ones(2, 3), torch.ones(4, 3)
            ok = torch.backends.mkldnn.is_available() and bool(
                (linear(x, pack(w, 2), None, "none", [], "") == 3).all()
            )
            _MKLDNN_OPS = (linear, linear_add, pack) if ok else False
        except (AttributeError, RuntimeError):
            _MKLDNN_OPS = False
    return _MKLDNN_OPS


def gemm_backend(x: Tensor) -> str:
    """The GEMM path used for ``x``: "mkldnn" (CPU float32 with oneDNN) or "generic" (torch.addmm).

    ``NLSTM_FUSED_GEMM=generic`` (or ``mkldnn``) overrides the automatic choice."""
    choice = os.environ.get("NLSTM_FUSED_GEMM", "auto")
    if choice not in GEMM_BACKENDS:
        raise ValueError(f"NLSTM_FUSED_GEMM must be one of {GEMM_BACKENDS}, got {choice!r}")
    if choice == "generic":
        return "generic"
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and bool(mkldnn_ops())
    if choice == "mkldnn" and not usable:
        raise RuntimeError("NLSTM_FUSED_GEMM=mkldnn needs float32 CPU tensors and a torch built with oneDNN")
    return "mkldnn" if usable else "generic"


_PERMS: dict[tuple[int, torch.device], Tensor] = {}


def gate_perm(n: int, device: torch.device) -> Tensor:
    """Row order i, f, o, g from torch's i, f, g, o: swaps the last two blocks (its own inverse)."""
    key = (n, device)
    perm = _PERMS.get(key)
    if perm is None:
        perm = torch.cat([torch.arange(0, 2 * n), torch.arange(3 * n, 4 * n), torch.arange(2 * n, 3 * n)])
        perm = _PERMS[key] = perm.to(device)
    return perm
