"""The flat argument list of the autograd Function, and the checks every entry runs first."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["check_inputs", "split_inputs"]


def split_inputs(depth: int, tensors: Sequence[Tensor]):
    """``(x, h0, *c0, *w_ih, *w_hh, *b)`` -> ``(x, h0, c0, w_ih, w_hh, b)``, the last four as sequences."""
    x, h0 = tensors[0], tensors[1]
    c0 = tensors[2 : 2 + depth]
    w_ih = tensors[2 + depth : 2 + 2 * depth]
    w_hh = tensors[2 + 2 * depth : 2 + 3 * depth]
    b = tensors[2 + 3 * depth : 2 + 4 * depth]
    return x, h0, c0, w_ih, w_hh, b


def check_inputs(x, h0, c0, w_ih, w_hh, b) -> None:
    """Raise a one-line error on a shape, dtype or device the kernel cannot run."""
    if x.dim() != 3:
        raise ValueError(f"x must be time-major (T, B, in), got shape {tuple(x.shape)}")
    T, B, m = x.shape
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    n = w_hh[0].shape[1]
    if h0.shape != (B, n) or any(c.shape != (B, n) for c in c0):
        raise ValueError(f"state tensors must be (batch, hidden) = ({B}, {n})")
    if w_ih[0].shape != (4 * n, m):
        raise ValueError(f"weight_ih_l0 must be ({4 * n}, {m}), got {tuple(w_ih[0].shape)}")
    dtypes = {t.dtype for t in (x, h0, *c0, *w_ih, *w_hh, *b)}
    if len(dtypes) != 1:
        raise TypeError(f"the fused Nested LSTM needs one dtype for input, state and weights, got {dtypes}")
    devices = {t.device for t in (x, h0, *c0, *w_ih, *w_hh, *b)}
    if len(devices) != 1:
        raise ValueError(f"input, state and weights must be on one device, got {devices}")
