"""Throughput of the Nested LSTM kernels against torch's own LSTM, in one table.

    python benchmarks/throughput.py                       # CPU sizes (or GPU sizes on a CUDA machine)
    python benchmarks/throughput.py --sizes 32,100,256 --threads 2 --depth 2 --repeats 5
    python benchmarks/throughput.py --quick               # a tiny run in seconds (the smoke test's)

For each size (B = batch, T = steps, H = width) it times, interleaved in one process so that every
ratio compares runs made under the same conditions:

- ``nlstm fused``: ``NestedLSTM(impl="fused")``, depth D (the default implementation: on CPU the
  C++ time loops where they are built, see the header line "fused loops"); on a GPU also
  ``nlstm fused + CUDA graphs`` (``NLSTM_CUDA_GRAPHS=1``, :mod:`nlstm.fused_cuda`); with
  ``--compare-loops`` also ``nlstm fused, Python loops`` (``NLSTM_CPP=0``, the fallback);
- ``nlstm reference``: ``NestedLSTM(impl="reference")``, the per-step autograd loop (fewer repeats);
- ``torch LSTM xD``: ``nlstm.StackedLSTM``, i.e. ``torch.nn.LSTM(num_layers=D)`` with one bias per
  layer, so exactly the Nested LSTM's parameter count; oneDNN on CPU, cuDNN on GPU. The ratios are
  against this row;
- ``torch LSTM x1 (matched)``: a single-layer ``nn.LSTM`` whose width matches the core's parameter
  count (``nlstm.core_parameters``).

Training = forward + backward of ``out.sum()`` + ``Adam.step()`` (input requires grad, as an
embedding's output would); inference = a ``torch.no_grad()`` forward. Tokens/s = B*T / median time.
Peak memory: on CPU the growth of the peak RSS (``VmHWM`` from ``/proc/self/status``, reset
before the steps) over two training steps above the RSS with model, optimizer and input built,
in a fresh subprocess per row (torch keeps no allocator statistics on CPU and tracemalloc does
not see its memory); on GPU ``torch.cuda.max_memory_allocated`` over two steps after one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nlstm import NestedLSTM, StackedLSTM, core_parameters

CPU_SIZES = [(32, 100, 64), (32, 100, 256), (64, 100, 512)]
TRAINED = "64,100,121,150"  # B, T, width, training steps: the CPU studies' size (issue 11)
TRAINED_THREADS = 1
GPU_SIZES = [(128, 100, 1000)]
QUICK_SIZES = [(4, 8, 16)]


@dataclass
class Row:
    name: str
    kind: str  # fused | reference | stacked | single
    width: int
    params: int
    train_tps: float | None = None
    infer_tps: float | None = None
    train_ms: float | None = None
    infer_ms: float | None = None
    mem_mib: float | None = None
    note: str = ""
    base: str | None = None  # the row its ratios are against (default: the first torch LSTM xD row)


def matched_single_width(depth: int, width: int, input_size: int) -> int:
    """Width of a 1-layer LSTM (one bias) with the parameter count closest to the depth-D core's."""
    target = core_parameters("nlstm", depth, width, input_size)
    best = min(range(1, 4 * width + 2), key=lambda w: abs(core_parameters("single", 1, w, input_size) - target))
    return best


def build(kind: str, depth: int, width: int, input_size: int, device: str) -> nn.Module:
    if kind in ("fused", "fused-graphs", "fused-python"):
        m: nn.Module = NestedLSTM(input_size, width, depth=depth, batch_first=False, impl="fused")
    elif kind == "reference":
        m = NestedLSTM(input_size, width, depth=depth, batch_first=False, impl="reference")
    elif kind == "stacked":
        m = StackedLSTM(input_size, width, num_layers=depth, batch_first=False)
    elif kind == "single":
        m = StackedLSTM(input_size, matched_single_width(depth, width, input_size), num_layers=1, batch_first=False)
    else:
        raise ValueError(kind)
    return m.to(device)


def contenders(depth: int, width: int, input_size: int, device: str = "cpu", compare_loops: bool = False) -> list[Row]:
    single = matched_single_width(depth, width, input_size)
    params = core_parameters("nlstm", depth, width, input_size)
    graphs = [Row("nlstm fused + CUDA graphs", "fused-graphs", width, params)] if device == "cuda" else []
    if compare_loops and device == "cpu":
        graphs.append(Row("nlstm fused, Python loops", "fused-python", width, params))
    return [
        Row("nlstm fused", "fused", width, params),
        *graphs,
        Row("nlstm reference", "reference", width, params),
        Row(f"torch LSTM x{depth}", "stacked", width, core_parameters("stacked", depth, width, input_size)),
        Row("torch LSTM x1 (matched)", "single", single, core_parameters("single", 1, single, input_size)),
    ]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One model with its optimizer and inputs; ``train()`` and ``infer()`` each time one step."""

    def __init__(self, kind: str, depth: int, B: int, T: int, H: int, device: str, seed: int = 0,
                 model: nn.Module | None = None, x: torch.Tensor | None = None, flush: bool = True) -> None:
        torch.manual_seed(seed)
        self.model = build(kind, depth, H, H, device) if model is None else model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.x = torch.randn(T, B, H, device=device) if x is None else x.detach().clone()
        self.x.requires_grad_(True)
        self.device = device
        self.graphs = kind == "fused-graphs"
        self.python_loops = kind == "fused-python"
        self.flush = flush

    def train(self) -> float:
        with self.env():
            sync(self.device)
            t0 = time.perf_counter()
            out = self.model(self.x)[0]
            out.sum().backward()
            self.opt.step()  # trained runners: the weights move a little per step, as in training
            self.opt.zero_grad(set_to_none=True)
            self.x.grad = None
            sync(self.device)
            return time.perf_counter() - t0

    def infer(self) -> float:
        with self.env():
            sync(self.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                self.model(self.x)
            sync(self.device)
            return time.perf_counter() - t0

    @contextlib.contextmanager
    def env(self):
        """The CUDA-graph row switches nlstm.fused_cuda on, the no-flush row the kernel's
        flush-to-zero off, the Python-loops row the C++ loops off, for their own calls only."""
        settings = {"NLSTM_CUDA_GRAPHS": "1" if self.graphs else "0",
                    "NLSTM_FLUSH_DENORMALS": "1" if self.flush else "0"}
        if self.python_loops:
            settings["NLSTM_CPP"] = "0"
        old = {k: os.environ.get(k) for k in settings}
        os.environ.update(settings)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def time_size(rows: list[Row], depth: int, B: int, T: int, H: int, device: str, repeats: int, warmup: int) -> None:
    """Interleave the contenders: in each round every model runs once, so slow drifts of the
    machine hit them all alike. The reference runs fewer rounds (it is slow)."""
    time_rows(rows, {r.name: Runner(r.kind, depth, B, T, H, device) for r in rows}, B * T, repeats, warmup)


def time_rows(rows: list[Row], runners: dict[str, Runner], tokens: int, repeats: int, warmup: int) -> None:
    """Time each row's runner (keyed by row name), interleaved round by round; medians."""
    ref_repeats = max(1, min(repeats, 3))
    for mode in ("train", "infer"):
        times: dict[str, list[float]] = {r.name: [] for r in rows}
        for i in range(warmup + repeats):
            for r in rows:
                if r.kind == "reference" and (i < warmup - 1 or i >= warmup + ref_repeats):
                    continue  # one warm-up round and ref_repeats timed rounds only
                dt = getattr(runners[r.name], mode)()
                if i >= warmup:
                    times[r.name].append(dt)
        for r in rows:
            med = statistics.median(times[r.name])
            setattr(r, f"{mode}_ms", med * 1e3)
            setattr(r, f"{mode}_tps", tokens / med)
            if r.kind == "reference":
                r.note = f"median of {len(times[r.name])}"


def time_trained(depth: int, width: int, B: int, T: int, steps: int, repeats: int, warmup: int,
                 threads: int, compare_loops: bool = False) -> tuple[list[Row], str]:
    """Fused NLSTM against nn.LSTM on trained weights (and on fresh ones, same inputs' source),
    ``threads`` torch threads; also the fused kernel with its flush-to-zero off."""
    from trained import trained_cores

    trained = trained_cores(depth, width, B, T, steps)
    fresh = trained_cores(depth, width, B, T, 0)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = core_parameters("nlstm", depth, width, trained.inputs["nlstm"].shape[2])
        rows, runners = [], {}
        for setup, label in ((trained, "trained"), (fresh, "fresh")):
            lstm = f"torch LSTM x{depth}, {label}"
            specs = [(f"nlstm fused, {label}", "nlstm", True), (lstm, "stacked", True)]
            if label == "trained":
                specs.insert(1, ("nlstm fused, trained, flush off", "nlstm", False))
                if compare_loops:
                    specs.insert(1, ("nlstm fused, trained, Python loops", "nlstm-python", True))
            for name, arch, flush in specs:
                kind = {"nlstm": "fused", "nlstm-python": "fused-python"}.get(arch, "stacked")
                rows.append(Row(name, kind, width, params, base=lstm))
                arch = "nlstm" if arch == "nlstm-python" else arch
                runners[name] = Runner(kind, depth, B, T, width, "cpu", model=setup.cores[arch],
                                       x=setup.inputs[arch], flush=flush)
        time_rows(rows, runners, B * T, repeats, warmup)
    finally:
        torch.set_num_threads(old_threads)
    how = (f"trained: {steps} Adam steps (lr {3e-3}) of B={B} x T={T} on {trained.corpus} characters, "
           f"final training BPC nested {trained.bpc['nlstm']:.2f}, stacked {trained.bpc['stacked']:.2f}"
           + (f", trained in this run ({trained.seconds:.0f} s)" if trained.seconds else ", loaded from the cache"))
    return rows, how


def measure_memory(kind: str, depth: int, B: int, T: int, H: int, device: str, threads: int) -> float | None:
    if device == "cuda":
        runner = Runner(kind, depth, B, T, H, device)
        runner.train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.train()
        runner.train()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--_memory", json.dumps([kind, depth, B, T, H, threads])]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        print(f"memory measurement for {kind} failed: {res.stderr[-500:]}", file=sys.stderr)
        return None
    return float(res.stdout.strip().splitlines()[-1])


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(spec: str) -> None:
    """Peak RSS growth over two training steps, above the RSS with the model, optimizer and input
    built: grads, Adam state, activations and whatever the kernels keep. The peak (VmHWM) is reset
    first through /proc/self/clear_refs, so the import's own high-water mark does not hide it."""
    kind, depth, B, T, H, threads = json.loads(spec)
    torch.set_num_threads(threads)
    runner = Runner(kind, depth, B, T, H, "cpu")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base, peak_field = _rss_kib("VmRSS"), "VmHWM"
    except OSError:  # no procfs: fall back to ru_maxrss, which may hide growth below an earlier peak
        base, peak_field = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, None
    runner.train()
    runner.train()
    peak = _rss_kib(peak_field) if peak_field else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) / 1024)


def profile_rows(rows: list[Row], depth: int, B: int, T: int, H: int, device: str, steps: int = 3) -> str:
    """torch.profiler's self-time table of a few training steps of the fused NLSTM and of the LSTM."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    out = []
    for r in rows:
        if r.kind not in ("fused", "stacked"):
            continue
        runner = Runner(r.kind, depth, B, T, H, device)
        for _ in range(2):
            runner.train()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                runner.train()
        out.append(f"profile: {r.name}, B={B}, T={T}, H={H}, {steps} training steps (times are totals over them)")
        out.append(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=48))
    return "\n".join(out)


def machine(device: str, threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [
        f"torch {torch.__version__}",
        f"python {platform.python_version()}",
        f"CPU: {cpu}, {os.cpu_count()} logical CPUs, torch threads {threads}",
        f"ISA: {isa_flags() or 'unknown'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}",
        f"oneDNN {torch.backends.mkldnn.is_available()}, MKL {torch.backends.mkl.is_available()}",
    ]
    if device == "cuda":
        cudnn = torch.backends.cudnn.version()
        parts.append(f"GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, cuDNN {cudnn})")
    else:
        parts.append("GPU: none (no GPU figures were measured in this run)")
    try:
        load = os.getloadavg()
        parts.append(f"load average at start {load[0]:.2f}")
    except OSError:
        pass
    return "; ".join(parts)


def fused_loops() -> str:
    """Which time loops the fused rows run on CPU, and how long loading (or first building) the C++
    ones took in this process."""
    from nlstm.fused import cpp

    if cpp.setting() == "0":
        return "Python (NLSTM_CPP=0)"
    t0 = time.perf_counter()
    ops = cpp.kernels()
    dt = time.perf_counter() - t0
    if ops is None:
        return f"Python (the C++ loops failed to build: {cpp.build_failure()})"
    return (f"C++ (nlstm/csrc/fused_cpu.cpp, built or loaded in {dt:.1f} s; "
            f"oneDNN GEMMs from {cpp.MIN_ONEDNN_STEP_MACS:,} multiply-adds per step)")


def isa_flags() -> str:
    """The vector ISA extensions that decide which kernels oneDNN, MKL and ATen pick."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in wanted if f in have) + (" (no AMX)" if "amx_tile" not in have else "")
    except OSError:
        pass
    return ""


TARGETS = [  # (what, size, mode, threads, minimum ratio): issue 11's targets, depth 2
    ("training on trained weights", "trained", "train", TRAINED_THREADS, 0.8),
    ("training", (32, 100, 256), "train", None, 0.9),
    ("training", (64, 100, 512), "train", None, 0.9),
    ("training", (32, 100, 64), "train", None, 0.7),
    ("no-grad inference, whole sequence", (32, 100, 256), "infer", None, 0.8),
]


def targets_table(results: dict, labels: dict, threads: int) -> str:
    """Where each target stands in this run (only the sizes that were run)."""
    lines = ["Targets (fused NLSTM vs torch.nn.LSTM(num_layers=2), same width, same run)", "",
             "| target | size | threads | measured | target | met? |", "|---|---|---:|---:|---:|---|"]
    for what, size, mode, t, minimum in TARGETS:
        if size not in results:
            continue
        rows = results[size]
        by_name = {r.name: r for r in rows}
        fused = next(r for r in rows if r.kind == "fused")
        base = by_name[fused.base] if fused.base else next(r for r in rows if r.kind == "stacked")
        ratio = getattr(fused, f"{mode}_tps") / getattr(base, f"{mode}_tps")
        lines.append(f"| {what} | {labels[size]} | {t or threads} | {ratio:.2f}x | >= {minimum}x | "
                     f"{'yes' if ratio >= minimum else 'no'} |")
    return "\n".join(lines)


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def table(size: tuple[int, int, int], rows: list[Row]) -> str:
    B, T, H = size
    by_name = {r.name: r for r in rows}
    first_lstm = next(r for r in rows if r.kind == "stacked")
    lines = [
        f"B={B}, T={T}, H={H}",
        "",
        "| model | width | params | train tok/s | train vs LSTM | infer tok/s | infer vs LSTM "
        "| train ms | infer ms | peak mem MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base = by_name[r.base] if r.base else first_lstm
        tr = r.train_tps / base.train_tps if r.train_tps and base.train_tps else None
        inf = r.infer_tps / base.infer_tps if r.infer_tps and base.infer_tps else None
        lines.append(
            f"| {r.name} | {r.width} | {r.params:,} | {fmt(r.train_tps, ',.0f')} | {fmt(tr, '.2f')}x | "
            f"{fmt(r.infer_tps, ',.0f')} | {fmt(inf, '.2f')}x | {fmt(r.train_ms, '.1f')} | {fmt(r.infer_ms, '.1f')} | "
            f"{fmt(r.mem_mib, '.0f')} | {r.note} |"
        )
    return "\n".join(lines)


def parse_sizes(values: list[str], device: str) -> list[tuple[int, int, int]]:
    sizes: list[tuple[int, int, int]] = []
    for v in values:
        if v == "cpu":
            sizes += CPU_SIZES
        elif v == "gpu":
            sizes += GPU_SIZES
        else:
            B, T, H = (int(p) for p in v.split(","))
            sizes.append((B, T, H))
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=None, help="cpu | gpu | B,T,H (several allowed)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, no memory: finishes in seconds")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables (fused vs LSTM)")
    p.add_argument("--trained", default=TRAINED, metavar="B,T,W,STEPS",
                   help=f"trained-weights comparison at {TRAINED_THREADS} thread (default {TRAINED}); 'none' skips it")
    p.add_argument("--compare-loops", action="store_true",
                   help="CPU: also time the fused kernel on its Python loops (NLSTM_CPP=0), interleaved")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory:
        _memory_child(args._memory)
        return
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes, args.repeats, args.warmup, args.no_memory = QUICK_SIZES, 2, 1, True
        args.trained = "4,8,16,3" if args.trained == TRAINED else args.trained
    else:
        sizes = parse_sizes(args.sizes or (["gpu"] if device == "cuda" else ["cpu"]), device)
    trained = None
    if args.trained != "none" and device == "cpu":
        try:
            trained = tuple(int(v) for v in args.trained.split(","))
            if len(trained) != 4 or min(trained) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--trained must be B,T,W,STEPS (four positive integers) or 'none', got {args.trained!r}")
    print(f"# NLSTM throughput, depth {args.depth}, device {device}")
    print(machine(device, args.threads))
    if device == "cpu":
        print(f"fused loops: {fused_loops()}")
    print(f"command: python benchmarks/throughput.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"timing: median of {args.repeats} interleaved rounds after {args.warmup} warm-up rounds "
          f"(reference: 1 warm-up, <= 3 rounds); memory: "
          + ("skipped" if args.no_memory else "peak RSS growth (VmHWM) over 2 training steps in a fresh process"
             if device == "cpu" else "torch.cuda.max_memory_allocated over 2 training steps"))
    print("the machine may be shared: rounds are interleaved (every model once per round) and medians taken")
    print()
    results: dict = {}
    labels: dict = {}
    for size in sizes:
        B, T, H = size
        rows = contenders(args.depth, H, H, device, args.compare_loops)
        time_size(rows, args.depth, B, T, H, device, args.repeats, args.warmup)
        if not args.no_memory:
            for r in rows:
                r.mem_mib = measure_memory(r.kind, args.depth, B, T, H, device, args.threads)
        print(table(size, rows))
        print(flush=True)
        results[size], labels[size] = rows, "B={},T={},H={}".format(*size)
        if args.profile:
            print(profile_rows(rows, args.depth, B, T, H, device), flush=True)
    if trained is not None:
        B, T, W, steps = trained
        rows, how = time_trained(args.depth, W, B, T, steps, args.repeats, args.warmup, TRAINED_THREADS,
                                 args.compare_loops)
        print(f"Trained vs fresh weights, {TRAINED_THREADS} thread; {how}; ratios against the torch LSTM "
              "row with the same kind of weights")
        print()
        print(table((B, T, W), rows))
        print(flush=True)
        results["trained"], labels["trained"] = rows, f"B={B},T={T},W={W}"
    print(targets_table(results, labels, args.threads))


if __name__ == "__main__":
    main()
