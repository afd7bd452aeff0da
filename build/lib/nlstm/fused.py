"""The fused Nested LSTM: the whole sequence in one custom autograd Function.

It computes the same function as the per-step reference (:func:`nlstm.cell.nested_lstm_step` in
a loop, ``NestedLSTM(impl="reference")``); ``tests/test_fused.py`` binds the two in float64 to
1e-10, gradients included. What makes it fast (numbers and profiles: ``docs/benchmarks.md``):

- **Hoisting, one GEMM per level per step.** The outer input projection ``x_t W_ih^0 + b^0`` of
  all steps is one GEMM before the loop; each step adds ``h_{t-1} W_hh^0``. Level k >= 1 does one
  GEMM per step, ``[u^k ; r^k] [W_ih^k  W_hh^k]^T + b^k``, the weights concatenated once per call.
- **oneDNN GEMMs on CPU (float32).** With the step weights reordered ("prepacked") once per call,
  oneDNN's small-batch GEMM runs the per-step products about 1.4x faster than the MKL ``addmm``
  behind ``torch.mm`` on this AMD CPU. Elsewhere (float64, CUDA, no oneDNN) the same loop runs
  ``torch.addmm(out=)``; ``NLSTM_FUSED_GEMM=generic`` forces that path.
- **A hand-written backward through time** that keeps only the post-activation gates, the
  memories, each level's GEMM input and two (T, B, n) helpers per level, and computes the weight
  gradients after the loop as one GEMM per level over all steps (stacked gate gradients
  (T*B, 4n) against stacked inputs), ``dx`` as one more.
- **A layout for the element-wise work.** Level k's buffer row at step t is
  ``[i, f, o, g | c^k_{t-1}]`` (gates reordered from torch's i, f, g, o by permuting weight
  rows once per call): one ``sigmoid_`` covers i, f, o, and ``[u ; r] = [i ; f] * [g ; c_prev]``
  is one multiply over ``(B, 2, n)`` views; in the backward ``[di ; df] = [du ; dr] * [g ; c_prev]``
  and ``[dg ; dc_prev] = [du ; dr] * [i ; f]`` are two. The new memory goes to row t+1.
- **No tanh kernel.** torch's CPU ``tanh`` is ~3x slower than its ``sigmoid``: the candidates
  use ``tanh(z) = 1 - 2 sigmoid(-2z)`` (their weight rows are scaled by -2 in the per-call copy,
  exactly, so one ``sigmoid`` covers all four gates) and the outputs ``o tanh(c) = o - 2 o s``
  with ``s = sigmoid(-2c)``, which the backward reuses: ``tanh(c) = 1 - 2s`` and
  ``o (1 - tanh(c)^2) = 4 o s (1 - s)``.
- **No per-call allocation or view-making in steady state.** Buffers come from a small pool and
  return to it when their call's backward is done; each pooled buffer carries its per-step views,
  made once (a view costs about 1 us), so the loops only launch kernels, all with ``out=``.

Inference (grad mode off, or nothing requires grad) runs the same forward without the helpers
the backward needs; a single step (T = 1, generation) skips the weight preparation and works on
the parameters as they are, in pooled scratch: it allocates only its outputs. Nothing is cached
between calls but scratch memory, each call's leased to it alone: no call can see stale weights
(whatever wrote them: fused/foreach optimizers, ``p.data``, ``load_state_dict``) or another
thread's buffers.

The code is device-agnostic: the same Function runs on CUDA tensors (the generic GEMM path).
CUDA-only extras (CUDA-graph replay of both time loops) live in :mod:`nlstm.fused_cuda`,
imported lazily and only for CUDA tensors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FusedNestedLSTMFunction", "empty_cache", "fused_nested_lstm", "gemm_backend"]

GEMM_BACKENDS = ("auto", "mkldnn", "generic")
MIN_PACKED_STEPS = 16  # no-grad calls shorter than this use the generic GEMMs (no packing)


def _g_is_tanh(level: int, depth: int, outer_identity: bool) -> bool:
    """Whether level ``level``'s candidate g goes through tanh (the reference's rule)."""
    return not (level == 0 and depth > 1 and outer_identity)


# --------------------------------------------------------------------------------------------
# GEMM backends
# --------------------------------------------------------------------------------------------

_MKLDNN_OPS: tuple | None | bool = None


def _mkldnn_ops():
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
    usable = x.device.type == "cpu" and x.dtype == torch.float32 and bool(_mkldnn_ops())
    if choice == "mkldnn" and not usable:
        raise RuntimeError("NLSTM_FUSED_GEMM=mkldnn needs float32 CPU tensors and a torch built with oneDNN")
    return "mkldnn" if usable else "generic"


_PERMS: dict[tuple[int, torch.device], Tensor] = {}


def _perm(n: int, device: torch.device) -> Tensor:
    """Row order i, f, o, g from torch's i, f, g, o: swaps the last two blocks (its own inverse)."""
    key = (n, device)
    perm = _PERMS.get(key)
    if perm is None:
        perm = torch.cat([torch.arange(0, 2 * n), torch.arange(3 * n, 4 * n), torch.arange(2 * n, 3 * n)])
        perm = _PERMS[key] = perm.to(device)
    return perm


@dataclass
class _Weights:
    """The weights in the kernel's layout: rows i, f, o, g; level k >= 1 as one [W_ih W_hh].

    Where g is a tanh its rows are multiplied by -2 (exact), so that one sigmoid over all four
    gates gives s = sigmoid(-2z) and then g = tanh(z) = 1 - 2s."""

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


def _prepare_weights(
    weights_ih: Sequence[Tensor],
    weights_hh: Sequence[Tensor],
    biases: Sequence[Tensor],
    outer_identity: bool,
    mkldnn: bool,
    batch: int,
) -> _Weights:
    depth = len(weights_ih)
    n = weights_hh[0].shape[1]
    perm = _perm(n, weights_hh[0].device)
    wx0 = weights_ih[0].detach().index_select(0, perm)
    wh0 = weights_hh[0].detach().index_select(0, perm)
    b0 = biases[0].detach().index_select(0, perm)
    wcat: list[Tensor | None] = [None]
    bk: list[Tensor | None] = [None]
    for k in range(1, depth):
        wcat.append(torch.cat([weights_ih[k].detach(), weights_hh[k].detach()], 1).index_select(0, perm))
        bk.append(biases[k].detach().index_select(0, perm))
    tanh_g = [_g_is_tanh(k, depth, outer_identity) for k in range(depth)]
    if tanh_g[0]:
        for w in (wx0, wh0, b0):
            w[3 * n :].mul_(-2.0)
    for k in range(1, depth):
        wcat[k][3 * n :].mul_(-2.0)  # type: ignore[index]
        bk[k][3 * n :].mul_(-2.0)  # type: ignore[index]
    w = _Weights(wx0, wh0, b0, wcat, bk, tanh_g, mkldnn)
    if mkldnn:
        pack = _mkldnn_ops()[2]
        w.ph0 = pack(wh0, batch)  # the hoisted GEMM takes wx0 as it is (packing it does not pay)
        w.pcat = [None] + [pack(wcat[k], batch) for k in range(1, depth)]
    return w


# --------------------------------------------------------------------------------------------
# Denormals
# --------------------------------------------------------------------------------------------
#
# A trained model's saturated gates produce denormal floats (sigmoid(-2z) of a large z, products
# of tiny gates). Intel CPUs handle those in slow microcode (issue 11: a trained model's step
# took 2.2x as long as with flush-to-zero); oneDNN's LSTM does not suffer. So the kernel's loops
# run with FTZ/DAZ set (denormal results and inputs count as zero: a change below 1.2e-38 in
# float32, 2.2e-308 in float64), on the calling thread AND on its OpenMP workers, which run the
# parallel GEMMs and element-wise kernels and have their own MXCSR (torch.set_flush_denormal
# sets only the calling thread's). The previous floating-point environment is put back
# afterwards. The workers are reached through libgomp (torch's CPU thread pool): one parallel
# region that calls the C library's ``fesetenv`` on every thread of the caller's team, no Python
# and no compiler involved. Where that is not available (no libgomp, not glibc), only the
# calling thread is flushed: enough with one thread, and the workers keep the slow path.

_FENV: tuple | None | bool = None


def _fenv():
    """(fegetenv, fesetenv, GOMP_parallel or None) through ctypes, or False where unavailable."""
    global _FENV
    if _FENV is None:
        _FENV = False
        try:
            import ctypes
            import ctypes.util
            import platform

            if platform.machine().lower() not in ("x86_64", "amd64"):
                return _FENV  # FTZ/DAZ only exist (and only matter) on x86
            libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
            get, put = libm.fegetenv, libm.fesetenv
            get.argtypes = put.argtypes = [ctypes.c_void_p]
            gomp = None
            maps = Path("/proc/self/maps")
            paths = {line.split()[-1] for line in maps.read_text().splitlines() if "/libgomp" in line} if (
                maps.exists()) else set()
            if len(paths) == 1:
                gomp = ctypes.CDLL(paths.pop()).GOMP_parallel
                gomp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                gomp.restype = None
            _FENV = (get, put, ctypes.cast(put, ctypes.c_void_p), gomp, ctypes.create_string_buffer)
        except (OSError, AttributeError):
            _FENV = False
    return _FENV


class _FlushDenormals:
    """Context: FTZ/DAZ on the calling thread and its OpenMP team (CPU only), restored on exit.

    Only the kernel's own work runs inside. On exit every thread of the team gets the calling
    thread's previous environment (what they all had, unless the caller changed its own alone).
    Waking the team costs ~30 us; ``workers=False`` flushes the calling thread only (~5 us), for
    single steps whose work is mostly on that thread. ``NLSTM_FLUSH_DENORMALS=0`` turns it off."""

    __slots__ = ("on", "saved", "workers")

    def __init__(self, x: Tensor, workers: bool = True) -> None:
        self.on = x.device.type == "cpu" and os.environ.get("NLSTM_FLUSH_DENORMALS", "1") != "0" and bool(_fenv())
        self.workers = workers

    def _all(self, env) -> None:
        get, put, put_ptr, gomp, _ = _fenv()  # type: ignore[misc]
        threads = torch.get_num_threads()
        if gomp is not None and threads > 1 and self.workers:
            gomp(put_ptr, env, threads, 0)  # every thread of the team, the caller included
        else:
            put(env)

    def __enter__(self):
        if self.on:
            get, put, _, _, buffer = _fenv()  # type: ignore[misc]
            self.saved = buffer(256)  # fenv_t is 28-32 bytes on glibc; room to spare
            get(self.saved)
            if not torch.set_flush_denormal(True):  # a CPU without FTZ/DAZ: nothing was changed
                self.on = False
                return self
            ftz = buffer(256)
            get(ftz)
            self._all(ftz)
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self._all(self.saved)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------

# Per-step GEMMs below this many multiply-adds run on the calling thread alone (B=32: widths up to
# 125, B=64: 88). Each parallel GEMM is an OpenMP fork/join; at small widths the join costs about as much
# as the work it splits, and when other processes hold the cores (a shared machine, parallel
# trials) every join waits for a descheduled worker: measured on the 2-core EPYC under load,
# B=32/T=100/H=64 took 843 ms per training step with 2 threads against 219 ms for nn.LSTM.
# The few GEMMs outside the loops (input projection, weight gradients) lose little at that size.
MAX_SERIAL_STEP_MACS = 4_000_000


class _threads_for:  # noqa: N801 - used like a function in a ``with``
    """Context: one torch thread inside when the per-step GEMMs are small (the whole call then
    runs on the calling thread: its few large GEMMs lose little, and nothing waits for workers)."""

    __slots__ = ("old",)

    def __init__(self, B: int, n: int) -> None:
        """The largest per-step GEMM, either direction: (B, 2n) x (2n, 4n) at a level k >= 1."""
        self.old = 0
        if B * 8 * n * n < MAX_SERIAL_STEP_MACS and os.environ.get("NLSTM_SERIAL_SMALL", "1") != "0":
            self.old = torch.get_num_threads()

    def __enter__(self):
        if self.old > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.old > 1:
            torch.set_num_threads(self.old)


# --------------------------------------------------------------------------------------------
# Buffers and the forward loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Buffers:
    """Per-call storage: all the backward needs besides x, h0 and the weights. Pooled, with the
    per-step views of every buffer made once per allocation (making one costs about 1 us)."""

    G: list[Tensor]  # level k: (T+1, B, 5n); row t = [i, f, o, g | c^k_{t-1}] after activation
    UR: list[Tensor | None]  # level k >= 1: (T, B, 2n) = [u^k_t ; r^k_t], the input of level k's GEMM
    S: list[Tensor]  # level k: (T, B, n) = sigmoid(-2 c^k_t), so tanh(c^k_t) = 1 - 2s
    Q: list[Tensor] | None  # training only; level k: (T, B, n) = o s (1 - s) (the backward fills it)
    scratch: Tensor  # (B, 2, n): the innermost [i g ; f c_prev]
    one: Tensor  # 0-d constants 1 and -2 (scalars as tensors: no per-call wrapping)
    minus_two: Tensor
    out: Tensor | None = None  # (T, B, n): h_t; fresh for every call (the caller keeps it)
    generation: int = 0  # counts loans from the pool (see _Lease)
    v: dict = field(default_factory=dict)  # per-step views: name -> level -> step

    def make_views(self) -> None:
        G, n, depth = self.G, self.S[0].shape[2], len(self.G)
        columns = {  # name: (first column, last column, as (B, 2, n) pairs)
            "gates": (0, 4 * n, False),
            "ifo": (0, 3 * n, False),
            "o": (2 * n, 3 * n, False),
            "g": (3 * n, 4 * n, False),
            "i_f": (0, 2 * n, False),  # [i ; f] and [g ; c_prev] as (B, 2n) rows...
            "g_cp": (3 * n, 5 * n, False),
            "i_f2": (0, 2 * n, True),  # ... and as (B, 2, n) pairs, to broadcast a (B, 1, n) over
            "g_cp2": (3 * n, 5 * n, True),
        }
        for name, (a, b, pairs) in columns.items():
            self.v[name] = [_steps(G[k][:-1], a, b, pairs) for k in range(depth)]
        self.v["c_new"] = [G[k][1:, :, 4 * n :].unbind(0) for k in range(depth)]
        self.v["s"] = [S.unbind(0) for S in self.S]
        self.v["q"] = [Q.unbind(0) for Q in self.Q] if self.Q is not None else None
        self.v["ur"] = [u.unbind(0) if u is not None else None for u in self.UR]
        self.v["ig_fc"] = self.scratch.unbind(1)
        self.v["scratch"] = self.scratch.view(self.scratch.shape[0], 2 * n)


def _allocate(T: int, B: int, n: int, depth: int, like: Tensor, train: bool) -> _Buffers:
    kw = dict(dtype=like.dtype, device=like.device)
    buf = _Buffers(
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


class _Pool:
    """Per-call buffers kept for the next call of the same shape.

    Allocating ~100 MB of fresh buffers per training step costs page faults (the allocator hands
    large blocks back to the OS), which showed up as element-wise ops several times slower than
    in isolation. Buffers leave the pool for one call and come back when that call's backward is
    done (or its autograd graph is freed); nothing the caller can see ever aliases pooled memory
    (outputs, memories and gradients are fresh tensors). At most ``max_free`` sets per shape and
    ``max_keys`` shapes are kept; :func:`empty_cache` drops them all.
    """

    def __init__(self, max_free: int = 2, max_keys: int = 4) -> None:
        self.max_free, self.max_keys = max_free, max_keys
        self.free: dict[tuple, list] = {}
        self.lock = threading.Lock()

    def take(self, key: tuple, make):
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


_POOL = _Pool()


def empty_cache() -> None:
    """Free the buffers the fused kernel keeps between calls."""
    _POOL.clear()


class _Lease:
    """A pooled item on loan to one call; goes back to the pool on :meth:`release` or when dropped."""

    __slots__ = ("key", "item", "released")

    def __init__(self, key: tuple, make) -> None:
        self.key, self.item, self.released = key, _POOL.take(key, make), False
        self.item.generation = getattr(self.item, "generation", 0) + 1

    def release(self) -> None:
        if not self.released:
            self.released = True
            if _POOL is not None:  # None only during interpreter shutdown
                _POOL.give(self.key, self.item)

    def __del__(self) -> None:
        self.release()


def _lease_buffers(T: int, B: int, n: int, depth: int, like: Tensor, train: bool) -> _Lease:
    key = ("fwd", T, B, n, depth, like.dtype, like.device, train)
    lease = _Lease(key, lambda: _allocate(T, B, n, depth, like, train))
    lease.item.out = torch.empty(T, B, n, dtype=like.dtype, device=like.device)  # the output is the caller's
    return lease


@dataclass
class _GradBuffers:
    """The backward's storage (pooled like :class:`_Buffers`, views made once)."""

    dA: list[Tensor]  # level k: (T, B, 4n), the gate pre-activation gradients (kernel order)
    dc: list[Tensor]  # level k: (B, n), the memory's gradient at the current step
    scr: list[Tensor]  # level k: (2, B, 2, n), [dg ; dc_prev], ping-ponged between steps
    dh: Tensor  # (B, n) and (B, 2n): the generic path's GEMM outputs
    dur: Tensor
    zeros: Tensor  # (B, n)
    generation: int = 0
    v: dict = field(default_factory=dict)


def _allocate_grads(T: int, B: int, n: int, depth: int, like: Tensor) -> _GradBuffers:
    kw = dict(dtype=like.dtype, device=like.device)
    g = _GradBuffers(
        dA=[torch.empty(T, B, 4 * n, **kw) for _ in range(depth)],
        dc=[torch.empty(B, n, **kw) for _ in range(depth)],
        scr=[torch.empty(2, B, 2, n, **kw) for _ in range(depth)],
        dh=torch.empty(B, n, **kw),
        dur=torch.empty(B, 2 * n, **kw),
        zeros=torch.zeros(B, n, **kw),
    )
    g.v = {
        "dA": [d.unbind(0) for d in g.dA],
        "d_if": [_steps(d, 0, 2 * n) for d in g.dA],
        "d_if2": [_steps(d, 0, 2 * n, pairs=True) for d in g.dA],
        "d_o": [_steps(d, 2 * n, 3 * n) for d in g.dA],
        "d_g": [_steps(d, 3 * n, 4 * n) for d in g.dA],
        "d_ifo": [_steps(d, 0, 3 * n) for d in g.dA],
        "dc_b": [d.unsqueeze(1) for d in g.dc],  # (B, 1, n): broadcast over a (B, 2, n) pair
        "scr_dg": [s[:, :, 0].unbind(0) for s in g.scr],
        "scr_dc": [s[:, :, 1].unbind(0) for s in g.scr],
        "scr_flat": [s.view(2, B, 2 * n).unbind(0) for s in g.scr],
    }
    return g


def _steps(t: Tensor, a: int, b: int, pairs: bool = False) -> tuple[Tensor, ...]:
    """Per-step views of columns a:b of a (T, B, C) buffer, made in one go; as (B, 2, n) pairs if asked."""
    v = t[:, :, a:b]
    return (v.unflatten(2, (2, (b - a) // 2)) if pairs else v).unbind(0)


def _forward_loop(x: Tensor, h0: Tensor, c0: Sequence[Tensor], w: _Weights, buf: _Buffers) -> None:
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
        linear, linear_add, _ = _mkldnn_ops()
        xp = linear(x2d, w.wx0, w.b0, "none", [], "").view(T, B, 4 * n).unbind(0)
    else:  # the hoisted input projection goes straight into the gate columns
        torch.addmm(w.b0, x2d, w.wx0.t(), out=G[0][:T].view(T * B, 5 * n)[:, : 4 * n])
    v = buf.v
    gates, g_col, o_col, i_f, g_cp, c_new = v["gates"], v["g"], v["o"], v["i_f"], v["g_cp"], v["c_new"]
    sig = [gates[k] if w.tanh_g[k] else v["ifo"][k] for k in range(depth)]
    outs = buf.out.unbind(0)
    h_prev = (h0, *outs[:-1])
    h_dest = [outs] + c_new[:-1]  # h^k is the output (k = 0) or the memory c^{k-1}
    s_t, ur = v["s"], v["ur"]
    scratch = v["scratch"]
    ig, fc = v["ig_fc"]
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


# --------------------------------------------------------------------------------------------
# The backward loop
# --------------------------------------------------------------------------------------------


def _backward_loop(
    dout: Tensor | None,
    dh_last: Tensor | None,
    dc_last: Sequence[Tensor | None],
    dmem: Sequence[Tensor | None],
    w: _Weights,
    buf: _Buffers,
    grads: _GradBuffers,
    packed_t: dict | None,
) -> list[Tensor]:
    """Back through time. Fills ``grads.dA[k]`` (T, B, 4n) with level k's gate pre-activation
    gradients (torch's gate meaning, kernel order i, f, o, g) and returns the gradients of c0^k
    (views into ``grads``). ``w`` must be unscaled; ``packed_t`` holds the oneDNN-packed
    transposed weights on the mkldnn path."""
    dA = grads.dA
    depth = len(dA)
    T, B, n = buf.out.shape
    inner = depth - 1
    mk = packed_t is not None
    zeros, dc, scr, dh_buf, dur = grads.zeros, grads.dc, grads.scr, grads.dh, grads.dur
    gv, v = grads.v, buf.v
    dA_t, d_o, d_g, d_ifo = gv["dA"], gv["d_o"], gv["d_g"], gv["d_ifo"]
    dc_b, scr_dg, scr_dc = gv["dc_b"], gv["scr_dg"], gv["scr_dc"]
    s_t, y_ifo, y_g = v["s"], v["ifo"], v["g"]
    # Q^k = o s (1 - s) for all steps at once: dc^k = carry + 4 dh^k Q^k.
    q_t = []
    for k in range(depth):
        torch.ops.aten.sigmoid_backward.grad_input(buf.G[k][:T, :, 2 * n : 3 * n], buf.S[k], grad_input=buf.Q[k])
        q_t.append(v["q"][k])
    # Pair views: (B, 2, n) where a (B, 1, n) broadcasts (the innermost level), else (B, 2n) rows.
    pair = [(gv["d_if2"][k], v["g_cp2"][k], v["i_f2"][k], scr[k]) if k == inner
            else (gv["d_if"][k], v["g_cp"][k], v["i_f"][k], gv["scr_flat"][k]) for k in range(depth)]
    if mk:
        linear, linear_add, _ = _mkldnn_ops()
        ph0t, pcatt = packed_t["h0"], packed_t["cat"]
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


# --------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------


def _split_inputs(depth: int, tensors: Sequence[Tensor]):
    x, h0 = tensors[0], tensors[1]
    c0 = tensors[2 : 2 + depth]
    w_ih = tensors[2 + depth : 2 + 2 * depth]
    w_hh = tensors[2 + 2 * depth : 2 + 3 * depth]
    b = tensors[2 + 3 * depth : 2 + 4 * depth]
    return x, h0, c0, w_ih, w_hh, b


def _param_and_input_grads(needs: Sequence[bool], x: Tensor, h0: Tensor, out: Tensor, w: _Weights,
                           dA: list[Tensor], UR: list[Tensor | None]):
    """After the loop: dx, dh0 (if ``needs``) and the weight gradients, each one GEMM over all
    steps, rows back in torch's i, f, g, o order. ``w`` unscaled."""
    depth = len(dA)
    T, B, n = out.shape
    m = x.shape[2]
    flat = [dA[k].view(T * B, 4 * n) for k in range(depth)]
    dx = None
    if needs[0]:  # oneDNN's GEMM beats torch.mm (MKL) here, with the weight as it is
        dx = _mkldnn_ops()[0](flat[0], w.wx0.t().contiguous(), None, "none", [], "") if w.mkldnn else None
        dx = (torch.mm(flat[0], w.wx0) if dx is None else dx).view(T, B, m)
    dh0 = torch.mm(dA[0][0], w.wh0) if needs[1] else None
    ones = out.new_ones(T * B)
    perm = _perm(n, out.device)
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


class FusedNestedLSTMFunction(torch.autograd.Function):
    """``apply(depth, outer_identity, return_memories, x, h0, *c0, *w_ih, *w_hh, *b)`` ->
    ``(out, h_T, *c_T, *memories)``: x time-major (T, B, in); memories only if asked for.
    Not twice differentiable."""

    @staticmethod
    def forward(ctx, depth: int, outer_identity: bool, return_memories: bool, *tensors: Tensor):
        x, h0, c0, w_ih, w_hh, b = _split_inputs(depth, tensors)
        _check(x, h0, c0, w_ih, w_hh, b)
        T, B, _ = x.shape
        n = h0.shape[1]
        mk = gemm_backend(x) == "mkldnn"
        with _threads_for(B, n), _FlushDenormals(x):
            w = _prepare_weights(w_ih, w_hh, b, outer_identity, mk, B)
            lease = _lease_buffers(T, B, n, depth, x, train=True)
            buf = lease.item
            _forward_loop(x, h0, c0, w, buf)
        w.ph0 = None  # the forward's packed weights are not needed any more
        w.pcat = []
        ctx.depth, ctx.return_memories = depth, return_memories
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
        with _threads_for(B, n), _FlushDenormals(x):
            w.unscale()
            packed_t = None
            if w.mkldnn:
                pack = _mkldnn_ops()[2]
                packed_t = {"h0": pack(w.wh0.t().contiguous(), B)}
                packed_t["cat"] = [None] + [pack(w.wcat[k].t().contiguous(), B) for k in range(1, depth)]
            da_lease = _Lease(("bwd", T, B, n, depth, out.dtype, out.device),
                              lambda: _allocate_grads(T, B, n, depth, out))
            dA = da_lease.item.dA
            dc0 = _backward_loop(dout, dh_last, dc_last, dmem, w, buf, da_lease.item, packed_t)
            dx, dh0, dw_ih, dw_hh, db = _param_and_input_grads(ctx.needs_input_grad[3:5], x, h0, out, w, dA,
                                                               buf.UR)
        dc0 = [dc0[k].clone() if ctx.needs_input_grad[5 + k] else None for k in range(depth)]
        da_lease.release()
        ctx.lease.release()  # buffers back to the pool; a retained graph's next backward checks generation
        return (None, None, None, dx, dh0, *dc0, *dw_ih, *dw_hh, *db)


def _check(x, h0, c0, w_ih, w_hh, b) -> None:
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


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------
#
# Nothing here is cached across calls except pooled scratch memory: every call reads the weights
# as they are now (an optimizer step of any kind, a write through ``p.data``, ``load_state_dict``
# or ``set_`` is always seen), and every call works in buffers leased to it alone, so any number
# of threads may run one model at once. Preparing (reordering, packing) the weights per call costs
# about as much as checking a cached copy against them would (both read all weights; measured in
# docs/benchmarks.md): ~1 % of a whole-sequence call, and single steps skip preparation entirely.


@dataclass
class _StepBuffers:
    """Scratch of one no-grad single step (pooled): the gate pre-activations of each level in
    torch's i, f, g, o order, the next level's input and "previous hidden", tanh(c)."""

    A: list[Tensor]  # level k: (B, 4n)
    U: list[Tensor]  # (B, n) each, level k >= 1 (index 0 unused)
    R: list[Tensor]
    th: Tensor  # (B, n)
    generation: int = 0


def _allocate_step(B: int, n: int, depth: int, like: Tensor) -> _StepBuffers:
    kw = dict(dtype=like.dtype, device=like.device)
    return _StepBuffers(
        A=[torch.empty(B, 4 * n, **kw) for _ in range(depth)],
        U=[torch.empty(B, n, **kw) for _ in range(depth)],
        R=[torch.empty(B, n, **kw) for _ in range(depth)],
        th=torch.empty(B, n, **kw),
    )


@torch.no_grad()
def _inference_step(x, h0, c0, w_ih, w_hh, b, outer_identity):
    """One step (T = 1, what generation makes after its prompt) straight from the parameters.

    The whole-sequence kernel's layout (reordered rows, scaled tanh rows, concatenated level
    weights) pays for itself over many steps; for one step, preparing it would cost as much as the
    step. So this runs :func:`nlstm.cell.nested_lstm_step`'s arithmetic on the weights as they are,
    in leased scratch buffers: it allocates only its outputs (h and the D new memories)."""
    _, B, _ = x.shape
    n, depth = h0.shape[1], len(c0)
    inner = depth - 1
    lease = _Lease(("step", B, n, depth, x.dtype, x.device), lambda: _allocate_step(B, n, depth, x))
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
        if _g_is_tanh(k, depth, outer_identity):
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
def _inference(x, h0, c0, w_ih, w_hh, b, outer_identity, return_memories):
    _check(x, h0, c0, w_ih, w_hh, b)
    T, B, _ = x.shape
    n, depth = h0.shape[1], len(c0)
    if T == 1:
        with _threads_for(B, n), _FlushDenormals(x, workers=False):
            out, state = _inference_step(x, h0, c0, w_ih, w_hh, b, outer_identity)
        return out, state, (tuple(c.unsqueeze(0).clone() for c in state[1]) if return_memories else None)
    # Packing the step weights for oneDNN (~0.5 ms quiet, tens of ms when other processes hold the
    # cores: the reorder is a parallel region) pays over a long sequence, not over a few steps.
    mk = T >= MIN_PACKED_STEPS and gemm_backend(x) == "mkldnn"
    with _threads_for(B, n), _FlushDenormals(x):
        w = _prepare_weights(w_ih, w_hh, b, outer_identity, mk, B)
        lease = _lease_buffers(T, B, n, depth, x, train=False)  # its out is a fresh tensor
        buf = lease.item
        _forward_loop(x, h0, c0, w, buf)
    out = buf.out
    c_last = tuple(buf.G[k][T, :, 4 * n :].clone() for k in range(depth))
    mems = tuple(buf.G[k][1:, :, 4 * n :].clone() for k in range(depth)) if return_memories else None
    lease.release()
    return out, (out[T - 1], c_last), mems


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
        return _inference(x_tm, h0, c0, weights_ih, weights_hh, biases, outer_identity, return_memories)
    if x_tm.device.type == "cuda":
        from nlstm import fused_cuda  # GPU-only extras, imported only here

        res = fused_cuda.apply(depth, outer_identity, return_memories, tensors)
    else:
        res = FusedNestedLSTMFunction.apply(depth, outer_identity, return_memories, *tensors)
    out, h_last, c_last = res[0], res[1], tuple(res[2 : 2 + depth])
    mems = tuple(res[2 + depth :]) if return_memories else None
    return out, (h_last, c_last), mems
