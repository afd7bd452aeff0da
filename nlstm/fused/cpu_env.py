"""The CPU environment the loops run in: flush-to-zero on every thread, and one thread at small widths.

Denormals. A trained model's saturated gates produce denormal floats (sigmoid(-2z) of a large z,
products of tiny gates). Intel CPUs handle those in slow microcode (issue 11: a trained model's
step took 2.2x as long as with flush-to-zero); oneDNN's LSTM does not suffer. So the kernel's
loops run with FTZ/DAZ set (denormal results and inputs count as zero: a change below 1.2e-38 in
float32, 2.2e-308 in float64), on the calling thread AND on its OpenMP workers, which run the
parallel GEMMs and element-wise kernels and have their own MXCSR (torch.set_flush_denormal sets
only the calling thread's). The previous floating-point environment is put back afterwards. The
workers are reached through libgomp (torch's CPU thread pool): one parallel region that calls the
C library's ``fesetenv`` on every thread of the caller's team, no Python and no compiler
involved. Where that is not available (no libgomp, not glibc), only the calling thread is
flushed: enough with one thread, and the workers keep the slow path.

Threads. A call uses the caller's torch threads, as ``nn.LSTM`` does. ``NLSTM_SERIAL_SMALL=1``
runs calls whose per-step GEMMs are below ``MAX_SERIAL_STEP_MACS`` multiply-adds (B=32: widths up to
125, B=64: 88) on the calling thread alone: for a machine shared beyond its cores, where every
OpenMP join waits for a descheduled worker (the 2-core EPYC under load: B=32/T=100/H=64 took 843
ms per training step with 2 threads against 219 ms on one). It was the default before the C++
loops; with them, on the quiet 2-core EPYC, 2 threads are faster at B=32/T=100/H=64 (training
19.1 against 27.2 ms a step, 0.72x against 0.55x of ``nn.LSTM``'s 2 threads), so a user's thread
count is kept unless asked. Study trials run one thread per CPU of their allotment anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_SERIAL_STEP_MACS", "FlushDenormals", "fenv", "threads_for"]

MAX_SERIAL_STEP_MACS = 4_000_000

_FENV: tuple | None | bool = None


def fenv():
    """(fegetenv, fesetenv, fesetenv's address, GOMP_parallel or None, ctypes.create_string_buffer)
    through ctypes, or False where unavailable."""
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


class FlushDenormals:
    """Context: FTZ/DAZ on the calling thread and its OpenMP team (CPU only), restored on exit.

    Only the kernel's own work runs inside. On exit every thread of the team gets the calling
    thread's previous environment (what they all had, unless the caller changed its own alone).
    Waking the team costs ~30 us; ``workers=False`` flushes the calling thread only (~5 us), for
    single steps whose work is mostly on that thread. ``NLSTM_FLUSH_DENORMALS=0`` turns it off."""

    __slots__ = ("on", "saved", "workers")

    def __init__(self, x: Tensor, workers: bool = True) -> None:
        self.on = x.device.type == "cpu" and os.environ.get("NLSTM_FLUSH_DENORMALS", "1") != "0" and bool(fenv())
        self.workers = workers

    def _all(self, env) -> None:
        get, put, put_ptr, gomp, _ = fenv()  # type: ignore[misc]
        threads = torch.get_num_threads()
        if gomp is not None and threads > 1 and self.workers:
            gomp(put_ptr, env, threads, 0)  # every thread of the team, the caller included
        else:
            put(env)

    def __enter__(self):
        if self.on:
            get, put, _, _, buffer = fenv()  # type: ignore[misc]
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


class threads_for:  # noqa: N801 - used like a function in a ``with``
    """Context: with ``NLSTM_SERIAL_SMALL=1``, one torch thread inside when the per-step GEMMs are
    small (the whole call then runs on the calling thread: nothing waits for a descheduled worker
    on an oversubscribed machine). By default the caller's threads are kept."""

    __slots__ = ("old",)

    def __init__(self, B: int, n: int) -> None:
        """The largest per-step GEMM, either direction: (B, 2n) x (2n, 4n) at a level k >= 1."""
        self.old = 0
        if B * 8 * n * n < MAX_SERIAL_STEP_MACS and os.environ.get("NLSTM_SERIAL_SMALL", "0") == "1":
            self.old = torch.get_num_threads()

    def __enter__(self):
        if self.old > 1:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self.old > 1:
            torch.set_num_threads(self.old)
