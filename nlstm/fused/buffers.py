"""Per-call storage, pooled between calls, with every per-step view made once per allocation.

Allocating ~100 MB of fresh buffers per training step costs page faults (the allocator hands
large blocks back to the OS), which showed up as element-wise ops several times slower than in
isolation; making a view costs about 1 us, so the loops find all theirs ready in named fields and
only launch kernels. Buffers leave the pool on a :class:`Lease` for one call and come back when
that call's backward is done (or its autograd graph is freed). Nothing the caller can see ever
aliases pooled memory (outputs, memories and gradients are fresh tensors), and each loan bumps the
buffers' ``generation``, so a retained graph whose buffers were lent again can tell.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "POOL",
    "ForwardBuffers",
    "ForwardViews",
    "GradBuffers",
    "GradViews",
    "Lease",
    "Pool",
    "StepBuffers",
    "allocate_forward",
    "allocate_grads",
    "allocate_step",
    "empty_cache",
    "lease_forward",
    "lease_grads",
    "lease_step",
]

Steps = tuple[Tensor, ...]  # one view per time step


def step_views(t: Tensor, a: int, b: int, pairs: bool = False) -> Steps:
    """Per-step views of columns a:b of a (T, B, C) buffer, made in one go; as (B, 2, n) pairs if asked."""
    v = t[:, :, a:b]
    return (v.unflatten(2, (2, (b - a) // 2)) if pairs else v).unbind(0)


@dataclass
class ForwardViews:
    """The per-step views of a :class:`ForwardBuffers`; each field is indexed [level][step].

    Gate columns of G[k][t] (t < T), the row ``[i, f, o, g | c^k_{t-1}]``."""

    gates: list[Steps]  # i, f, o, g
    ifo: list[Steps]
    o: list[Steps]
    g: list[Steps]
    i_f: list[Steps]  # [i ; f] and [g ; c_prev] as (B, 2n) rows...
    g_cp: list[Steps]
    i_f2: list[Steps]  # ... and as (B, 2, n) pairs, to broadcast a (B, 1, n) over
    g_cp2: list[Steps]
    c_new: list[Steps]  # c^k_t, the memory column of row t+1
    s: list[Steps]  # rows of S
    q: list[Steps] | None  # rows of Q (training only)
    ur: list[Steps | None]  # rows of UR (level k >= 1)
    ig_fc: tuple[Tensor, Tensor]  # the innermost scratch's i g and f c_prev, (B, n) each
    scratch: Tensor  # the same scratch as (B, 2n)


@dataclass
class ForwardBuffers:
    """What one call's forward writes: all the backward needs besides x, h0 and the weights."""

    G: list[Tensor]  # level k: (T+1, B, 5n); row t = [i, f, o, g | c^k_{t-1}] after activation
    UR: list[Tensor | None]  # level k >= 1: (T, B, 2n) = [u^k_t ; r^k_t], the input of level k's GEMM
    S: list[Tensor]  # level k: (T, B, n) = sigmoid(-2 c^k_t), so tanh(c^k_t) = 1 - 2s
    Q: list[Tensor] | None  # training only; level k: (T, B, n) = o s (1 - s) (the backward fills it)
    scratch: Tensor  # (B, 2, n): the innermost [i g ; f c_prev]
    one: Tensor  # 0-d constants 1 and -2 (scalars as tensors: no per-call wrapping)
    minus_two: Tensor
    out: Tensor | None = None  # (T, B, n): h_t; fresh for every call (the caller keeps it)
    generation: int = 0  # counts loans from the pool (see Lease)
    views: ForwardViews | None = None  # set by make_views()

    def make_views(self) -> None:
        G, n, depth = self.G, self.S[0].shape[2], len(self.G)

        def cols(a: int, b: int, pairs: bool = False) -> list[Steps]:
            return [step_views(G[k][:-1], a, b, pairs) for k in range(depth)]

        self.views = ForwardViews(
            gates=cols(0, 4 * n),
            ifo=cols(0, 3 * n),
            o=cols(2 * n, 3 * n),
            g=cols(3 * n, 4 * n),
            i_f=cols(0, 2 * n),
            g_cp=cols(3 * n, 5 * n),
            i_f2=cols(0, 2 * n, pairs=True),
            g_cp2=cols(3 * n, 5 * n, pairs=True),
            c_new=[G[k][1:, :, 4 * n :].unbind(0) for k in range(depth)],
            s=[S.unbind(0) for S in self.S],
            q=[Q.unbind(0) for Q in self.Q] if self.Q is not None else None,
            ur=[u.unbind(0) if u is not None else None for u in self.UR],
            ig_fc=self.scratch.unbind(1),
            scratch=self.scratch.view(self.scratch.shape[0], 2 * n),
        )


def allocate_forward(T: int, B: int, n: int, depth: int, like: Tensor, train: bool) -> ForwardBuffers:
    """Fresh forward buffers (``Q`` only with ``train``), views made."""
    kw = dict(dtype=like.dtype, device=like.device)
    buf = ForwardBuffers(
        G=[torch.empty(T + 1, B, 5 * n, **kw) for _ in range(depth)],
        UR=[None] + [torch.empty(T, B, 2 * n, **kw) for _ in range(1, depth)],
        S=[torch.empty(T, B, n, **kw) for _ in range(depth)],
        Q=[torch.empty(T, B, n, **kw) for _ in range(depth)] if train else None,
        scratch=torch.empty(B, 2, n, **kw),
        one=torch.ones((), **kw),
        minus_two=torch.full((), -2.0, **kw),
        out=torch.empty(T, B, n, **kw),
    )
    buf.make_views()
    return buf


@dataclass
class GradViews:
    """The per-step views of a :class:`GradBuffers`; fields indexed [level][step] unless noted."""

    dA: list[Steps]
    d_if: list[Steps]  # [di ; df] as (B, 2n) rows...
    d_if2: list[Steps]  # ... and as (B, 2, n) pairs
    d_o: list[Steps]
    d_g: list[Steps]
    d_ifo: list[Steps]
    dc_b: list[Tensor]  # [level]: dc as (B, 1, n), to broadcast over a (B, 2, n) pair
    scr_dg: list[Steps]  # [level][parity]: the ping-pong scratch's dg, dc_prev, and both as (B, 2n)
    scr_dc: list[Steps]
    scr_flat: list[Steps]


@dataclass
class GradBuffers:
    """The backward's storage (pooled like :class:`ForwardBuffers`, views made once)."""

    dA: list[Tensor]  # level k: (T, B, 4n), the gate pre-activation gradients (kernel order)
    dc: list[Tensor]  # level k: (B, n), the memory's gradient at the current step
    scr: list[Tensor]  # level k: (2, B, 2, n), [dg ; dc_prev], ping-ponged between steps
    dh: Tensor  # (B, n) and (B, 2n): the generic path's GEMM outputs
    dur: Tensor
    zeros: Tensor  # (B, n)
    generation: int = 0
    views: GradViews | None = None


def allocate_grads(T: int, B: int, n: int, depth: int, like: Tensor) -> GradBuffers:
    """Fresh backward buffers, views made."""
    kw = dict(dtype=like.dtype, device=like.device)
    g = GradBuffers(
        dA=[torch.empty(T, B, 4 * n, **kw) for _ in range(depth)],
        dc=[torch.empty(B, n, **kw) for _ in range(depth)],
        scr=[torch.empty(2, B, 2, n, **kw) for _ in range(depth)],
        dh=torch.empty(B, n, **kw),
        dur=torch.empty(B, 2 * n, **kw),
        zeros=torch.zeros(B, n, **kw),
    )
    g.views = GradViews(
        dA=[d.unbind(0) for d in g.dA],
        d_if=[step_views(d, 0, 2 * n) for d in g.dA],
        d_if2=[step_views(d, 0, 2 * n, pairs=True) for d in g.dA],
        d_o=[step_views(d, 2 * n, 3 * n) for d in g.dA],
        d_g=[step_views(d, 3 * n, 4 * n) for d in g.dA],
        d_ifo=[step_views(d, 0, 3 * n) for d in g.dA],
        dc_b=[d.unsqueeze(1) for d in g.dc],
        scr_dg=[s[:, :, 0].unbind(0) for s in g.scr],
        scr_dc=[s[:, :, 1].unbind(0) for s in g.scr],
        scr_flat=[s.view(2, B, 2 * n).unbind(0) for s in g.scr],
    )
    return g


@dataclass
class StepBuffers:
    """Scratch of one no-grad single step: the gate pre-activations of each level in torch's
    i, f, g, o order, the next level's input and "previous hidden", tanh(c)."""

    A: list[Tensor]  # level k: (B, 4n)
    U: list[Tensor]  # (B, n) each, level k >= 1 (index 0 unused)
    R: list[Tensor]
    th: Tensor  # (B, n)
    generation: int = 0


def allocate_step(B: int, n: int, depth: int, like: Tensor) -> StepBuffers:
    kw = dict(dtype=like.dtype, device=like.device)
    return StepBuffers(
        A=[torch.empty(B, 4 * n, **kw) for _ in range(depth)],
        U=[torch.empty(B, n, **kw) for _ in range(depth)],
        R=[torch.empty(B, n, **kw) for _ in range(depth)],
        th=torch.empty(B, n, **kw),
    )


class Pool:
    """Per-call buffers kept for the next call of the same shape, behind one lock.

    At most ``max_free`` sets per shape and ``max_keys`` shapes are kept (least recently used
    shapes go first); :func:`empty_cache` drops them all.
    """

    def __init__(self, max_free: int = 2, max_keys: int = 4) -> None:
        self.max_free, self.max_keys = max_free, max_keys
        self.free: dict[tuple, list] = {}
        self.lock = threading.Lock()

    def take(self, key: tuple, make: Callable[[], object]):
        with self.lock:
            items = self.free.get(key)
            item = items.pop() if items else None
            if key in self.free:  # most recently used last
                self.free[key] = self.free.pop(key)
        return make() if item is None else item

    def give(self, key: tuple, item) -> None:
        with self.lock:
            items = self.free.setdefault(key, [])
            if len(items) < self.max_free:
                items.append(item)
            while len(self.free) > self.max_keys:
                del self.free[next(iter(self.free))]

    def clear(self) -> None:
        with self.lock:
            self.free.clear()


POOL = Pool()


def empty_cache() -> None:
    """Free the buffers the fused kernel keeps between calls."""
    POOL.clear()


class Lease:
    """A pooled item on loan to one call; goes back to the pool on :meth:`release` or when dropped."""

    __slots__ = ("key", "item", "released")

    def __init__(self, key: tuple, make: Callable[[], object]) -> None:
        self.key, self.item, self.released = key, POOL.take(key, make), False
        self.item.generation = getattr(self.item, "generation", 0) + 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            if POOL is not None:  # None only during interpreter shutdown
                POOL.give(self.key, self.item)

    def __del__(self) -> None:
        self.release()


def lease_forward(T: int, B: int, n: int, depth: int, like: Tensor, train: bool) -> Lease:
    """Forward buffers for one call; their ``out`` is a fresh tensor (the output is the caller's)."""
    key = ("fwd", T, B, n, depth, like.dtype, like.device, train)
    lease = Lease(key, lambda: allocate_forward(T, B, n, depth, like, train))
    lease.item.out = torch.empty(T, B, n, dtype=like.dtype, device=like.device)
    return lease


def lease_grads(T: int, B: int, n: int, depth: int, like: Tensor) -> Lease:
    """Backward buffers for one call's backward."""
    return Lease(("bwd", T, B, n, depth, like.dtype, like.device), lambda: allocate_grads(T, B, n, depth, like))


def lease_step(B: int, n: int, depth: int, like: Tensor) -> Lease:
    """Scratch for one no-grad single step."""
    return Lease(("step", B, n, depth, like.dtype, like.device), lambda: allocate_step(B, n, depth, like))
