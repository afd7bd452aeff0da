"""The optional compiled time loops on CPU (``nlstm/csrc/fused_cpu.cpp``), built on first use.

At small widths the Python loops are dispatch-bound: each step issues ~26 element-wise kernels
and a few GEMMs, each costing a few microseconds of dispatch whatever its size. The C++ loops
issue the same GEMMs through ATen and do each level's element-wise work as one loop, in the same
buffers and layouts (so the weight gradients after the backward loop stay in Python). Numbers:
docs/benchmarks.md.

The source ships with the package and is compiled by :func:`torch.utils.cpp_extension.load` the
first time a CPU call wants it (about a minute on 2 cores), into ``$NLSTM_CACHE_DIR`` (else
``~/.cache/nlstm``)/``torch_extensions``, one folder per :class:`BuildKey`: everything torch's build
rebuilds on (torch's and Python's header and library paths, the compiler and its flags) and what
the library depends on (torch's version, the CPU's features, as it is compiled with
``-march=native``, and the source's content, which is copied into the folder). Two environments
with the same torch on one machine (a checkout's ``.venv`` and an installed wheel, two checkouts,
the code Ray ships to a node) therefore build once each instead of rebuilding each other's build on
every first call. A finished build is marked by ``built.json``; later processes load the library
without running the build again. Builds run under :class:`nlstm.fused.build_lock.BuildLock`: a
process waiting for another's build says so on stderr, and a build whose process was killed is
taken over at once. A fresh install needs no compiler: if the build fails for any reason the
Python loops run and one warning line says why, once per process. ``NLSTM_CPP=0`` runs the Python
loops. The C++ loops are the default at every width: they were measured faster than (or, at large
widths where the GEMMs dominate, as fast as) the Python loops at every size tried
(docs/benchmarks.md). CUDA tensors never come here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sysconfig
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CPP_CHOICES", "MIN_ONEDNN_STEP_MACS", "SOURCE", "BuildKey", "backward_loop_cpp", "build_dir",
    "build_failure", "clear_stale_lock", "forward_loop_cpp", "kernels", "onednn_in_cpp", "prepare", "setting",
    "use_cpp",
]

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "fused_cpu.cpp"
NAME = "nlstm_fused_cpu"
CFLAGS = ("-O3", "-march=native", "-fno-math-errno")
STAMP = "built.json"  # written after a finished build: its BuildKey
CPP_CHOICES = ("1", "0")
MIN_ONEDNN_STEP_MACS = 6_000_000  # smaller per-step GEMMs: the C++ loops use ATen's (see onednn_in_cpp)

STALE_LOCK_SECONDS = 1800  # without a BuildLock: a torch build lock older than this was left by a killed build
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "ops": the loaded op namespace, or "failed": the reason


def _cpu_features() -> str:
    """The machine and the CPU's features (``-march=native`` code must not run on another CPU
    sharing the cache folder)."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "model name", "Features", "CPU part")):
                flags += line
                if line.startswith("flags"):
                    break
    return f"{platform.machine()}|{flags}"


@dataclass(frozen=True)
class BuildKey:
    """What a build of the C++ loops depends on; one build folder per distinct key.

    torch writes the include and library paths, the compiler and the flags into the build's
    ``build.ninja``, and ninja rebuilds whenever that command changes: two environments sharing a
    folder rebuilt each other's library on every first call (issue 19: 30+ builds in 22 minutes).
    So those are all in the key, with torch's version, the CPU and the source's content. The
    interpreter itself is not: it only enters the build through these paths (a venv shares its base
    Python's headers), so environments that would write the same ``build.ninja`` share one build."""

    torch_version: str
    include_paths: tuple[str, ...]  # torch's headers and Python.h (-isystem)
    library_paths: tuple[str, ...]  # torch's libraries (-L)
    compiler: str  # $CXX as torch runs it, and where it resolves
    cflags: tuple[str, ...]
    cpu: str
    source_sha256: str

    @classmethod
    def current(cls, source: bytes) -> BuildKey:
        """The key of a build of ``source`` in this process's environment."""
        from torch.utils import cpp_extension

        includes = list(cpp_extension.include_paths())  # the CPU build's, as torch's build uses them
        python_include = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix")
        if python_include:
            includes.append(python_include)
        cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
        return cls(torch.__version__, tuple(includes), tuple(cpp_extension.library_paths()),
                   f"{cxx} ({shutil.which(cxx)})", CFLAGS, _cpu_features(), hashlib.sha256(source).hexdigest())

    def tag(self) -> str:
        """A short hash of the key: the build folder's suffix."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_dir(key: BuildKey | None = None) -> Path:
    """Where the library is built: ``$NLSTM_CACHE_DIR`` (else ``~/.cache/nlstm``)/torch_extensions/<name>-<tag>,
    for ``key`` (default: this environment's key for :data:`SOURCE`)."""
    from nlstm.data.download import default_cache_dir  # lazily: only a build needs it

    key = key or BuildKey.current(SOURCE.read_bytes())
    return default_cache_dir() / "torch_extensions" / f"{NAME}-{key.tag()}"


def _is_built(folder: Path, key: BuildKey) -> bool:
    """A finished build of ``key`` is in ``folder``: its stamp names the key and the library is there."""
    from torch.utils.cpp_extension import LIB_EXT

    try:
        return (json.loads((folder / STAMP).read_text()) == json.loads(json.dumps(asdict(key)))
                and (folder / f"{NAME}{LIB_EXT}").is_file())
    except (OSError, ValueError):
        return False


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def clear_stale_lock(folder: Path, max_age: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``folder/lock`` if it is older than ``max_age`` seconds; True if removed.

    torch's build holds that file while it compiles, and every other process waits (with no time
    limit) until it disappears; a process killed mid-build (a trial stopped by its scheduler)
    leaves it behind. Only the fallback where the build folder cannot be locked (see
    :mod:`nlstm.fused.build_lock`) relies on this age rule; a build takes about a minute here."""
    lock = folder / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age:
            lock.unlink()
            return True
    except FileNotFoundError:
        pass
    return False


def _build():
    """Compile (or load the already compiled) library; returns ``torch.ops.nlstm_fused_cpu``."""
    from torch.utils import cpp_extension

    from nlstm.fused.build_lock import BuildLock

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:  # checked first: torch would log a screenful before failing
        raise RuntimeError(f"no C++ compiler found ({compiler!r}; set CXX to use another)")
    source = SOURCE.read_bytes()
    key = BuildKey.current(source)
    folder = build_dir(key)
    if not _is_built(folder, key):
        folder.mkdir(parents=True, exist_ok=True)
        with BuildLock(folder, what="the build of the C++ loops") as lock:
            if not lock.locked:
                clear_stale_lock(folder)
            if not _is_built(folder, key):  # else: built while this process waited
                if lock.locked:  # the lock is ours: a torch `lock` here was left by a killed builder
                    (folder / "lock").unlink(missing_ok=True)
                (folder / STAMP).unlink(missing_ok=True)
                copy = folder / SOURCE.name  # compiled from here: where SOURCE lies is not in the build
                if not copy.is_file() or copy.read_bytes() != source:
                    _write_atomically(copy, source)
                cpp_extension.load(name=NAME, sources=[str(copy)], extra_cflags=list(CFLAGS),
                                   build_directory=str(folder), is_python_module=False, verbose=False)
                _write_atomically(folder / STAMP, json.dumps(asdict(key), indent=1).encode())
                return torch.ops.nlstm_fused_cpu
    torch.ops.load_library(str(folder / f"{NAME}{cpp_extension.LIB_EXT}"))
    return torch.ops.nlstm_fused_cpu


def _onednn_works(ops) -> bool:
    """Whether the library's oneDNN GEMMs run here: a tiny float32 forward with packed weights must
    equal the one with ATen's GEMMs (the C++ side looks oneDNN's ops up by name at their first call)."""
    from nlstm.fused.buffers import allocate_forward
    from nlstm.fused.gemm import mkldnn_ops
    from nlstm.fused.weights import prepare_weights

    if not mkldnn_ops():
        return False
    gen = torch.Generator().manual_seed(0)
    T, B, n, m, depth = 3, 2, 4, 3, 2
    w_ih = [torch.randn(4 * n, m if k == 0 else n, generator=gen) for k in range(depth)]
    w_hh = [torch.randn(4 * n, n, generator=gen) for _ in range(depth)]
    b = [torch.randn(4 * n, generator=gen) for _ in range(depth)]
    x, h0 = torch.randn(T, B, m, generator=gen), torch.randn(B, n, generator=gen)
    c0 = [torch.randn(B, n, generator=gen) for _ in range(depth)]
    outs = []
    for mk in (False, True):
        w = prepare_weights(w_ih, w_hh, b, True, mk, B)
        buf = allocate_forward(T, B, n, depth, x, train=True)
        try:
            forward_loop_cpp(ops, x, h0, c0, w, buf, train=True)
        except RuntimeError:
            return False
        outs.append(buf.out)
    return torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def failure_reason(e: BaseException) -> str:
    """One line for the warning: the error's first line (up to the compiler output torch appends to
    it) and, for a compiler's output, its last line, which usually names the problem."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    head = lines[0]
    if head.startswith("Error building extension"):
        head = head.split(":", 1)[0]
    tail = f" ... {lines[-1]}" if len(lines) > 1 else ""
    return " ".join(f"{type(e).__name__}: {head}{tail}".split())[:300]


def build_failure() -> str | None:
    """Why the library could not be built in this process (None if it was not tried or it loaded)."""
    return _STATE.get("failed")  # type: ignore[return-value]


def onednn_in_cpp(B: int, n: int) -> bool:
    """Whether the C++ loops use oneDNN's prepacked GEMMs for batch ``B`` and width ``n``: only
    where the library's oneDNN calls were checked to work (once, after it loaded), and where the
    largest per-step GEMM (B x 2n x 4n) has at least :data:`MIN_ONEDNN_STEP_MACS` multiply-adds.
    Below that, oneDNN's fixed cost per call (a fresh output, the primitive's lookup) outweighs its
    faster kernel and ATen's GEMM into the buffer wins (measured on the 2-core EPYC, one thread:
    B=32 at widths 64 and 128 and B=64 at 96 faster on ATen, B=64/W=121 and B=32/W=256 on oneDNN,
    B=32/W=176 even; docs/benchmarks.md)."""
    return bool(_STATE.get("onednn")) and B * 8 * n * n >= MIN_ONEDNN_STEP_MACS


def kernels():
    """The op namespace (``forward``, ``backward``), or None when the build failed (warned once)."""
    ops = _STATE.get("ops")
    if ops is not None or "failed" in _STATE:
        return ops
    with _LOCK:
        if "ops" not in _STATE and "failed" not in _STATE:
            try:
                ops = _build()
                _STATE["onednn"] = _onednn_works(ops)
                _STATE["ops"] = ops
            except Exception as e:  # noqa: BLE001 - any build failure means: run the Python loops
                reason = failure_reason(e)
                _STATE["failed"] = reason
                warnings.warn(f"nlstm: the C++ CPU loops could not be built, using the Python loops ({reason})",
                              RuntimeWarning, stacklevel=3)
    return _STATE.get("ops")


def setting() -> str:
    """``NLSTM_CPP``: 1 (default: the C++ loops where they build) or 0; anything else is a one-line error."""
    choice = os.environ.get("NLSTM_CPP", "1")
    if choice not in CPP_CHOICES:
        raise ValueError(f"NLSTM_CPP must be one of {CPP_CHOICES}, got {choice!r}")
    return choice


def prepare() -> bool:
    """Build or load the C++ loops now rather than inside the first call, so that a first-use build
    (up to a minute) is not timed as training. True if the C++ loops will run (``NLSTM_CPP``)."""
    return setting() != "0" and kernels() is not None


def use_cpp(x: Tensor):
    """The op namespace if this call (input ``x``) runs the C++ loops, else None: CPU float32 and
    float64 only, unless ``NLSTM_CPP=0`` or the library could not be built."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return None
    return None if setting() == "0" else kernels()


def forward_loop_cpp(ops, x: Tensor, h0: Tensor, c0, w, buf, train: bool) -> None:
    """:func:`nlstm.fused.forward.forward_loop` in C++: the same buffers filled the same way
    (``S`` only with ``train``; ``w`` scaled, without oneDNN packing)."""
    ops.forward(x.contiguous(), h0.contiguous(), [c.contiguous() for c in c0], w.wx0, w.wh0, w.b0, w.wcat[1:],
                w.bk[1:], [int(g) for g in w.tanh_g], buf.G, buf.UR[1:], buf.S, buf.out, train,
                w.ph0 if w.mkldnn else None, w.pcat[1:] if w.mkldnn else [])


def backward_loop_cpp(ops, dout, dh_last, dc_last, dmem, w, buf, grads, packed_t) -> list[Tensor]:
    """:func:`nlstm.fused.backward.backward_loop` in C++: fills ``grads.dA`` and returns the
    gradients of c0^k (views into ``grads``). ``w`` unscaled; ``packed_t`` as for the Python loop."""
    B, n = grads.dh.shape
    carry = [s.view(-1)[: B * n].view(B, n) for s in grads.scr]

    def flat(t):
        return None if t is None else t.contiguous()

    ops.backward(flat(dout), flat(dh_last), [flat(c) for c in dc_last], [flat(d) for d in dmem], w.wh0,
                 w.wcat[1:], [int(g) for g in w.tanh_g], buf.G, buf.S, grads.dA, grads.dc, carry, grads.dh,
                 grads.dur, packed_t.wh0 if packed_t is not None else None,
                 packed_t.wcat[1:] if packed_t is not None else [])
    return carry
