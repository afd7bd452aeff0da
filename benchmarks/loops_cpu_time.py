"""The fused kernel's C++ and Python time loops against torch's LSTM, in CPU time, one thread.

    python benchmarks/loops_cpu_time.py                  # B,T,H = 32,100,64  32,100,256  64,100,121
    python benchmarks/loops_cpu_time.py --sizes 32,100,64 --rounds 9

On a shared machine wall-clock ratios measure the scheduler (a descheduled OpenMP worker stalls
every join); the process CPU time of a one-thread run does not count the time the process waits,
so it compares the kernels' work even under load. Per round and size, interleaved: forward and
backward of ``out.sum()`` (input requires grad) and a ``no_grad`` forward; medians reported.
Depth 2, input width H, fresh weights; the LSTM is ``torch.nn.LSTM(num_layers=2)`` (oneDNN).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from nlstm import NestedLSTM
from nlstm.fused import cpp

SIZES = [(32, 100, 64), (32, 100, 256), (64, 100, 121)]


def measure(B: int, T: int, H: int, rounds: int) -> dict[str, list[float]]:
    """Median CPU ms of (forward, backward, inference) per contender."""
    torch.manual_seed(0)
    models = {"C++ loops": NestedLSTM(H, H, depth=2, impl="fused"), "LSTM x2": torch.nn.LSTM(H, H, num_layers=2)}
    models["Python loops"] = models["C++ loops"]
    env = {"C++ loops": "1", "Python loops": "0", "LSTM x2": "1"}
    x = torch.randn(T, B, H, requires_grad=True)
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in models}
    clock = time.process_time
    for r in range(rounds + 1):  # the first round warms up
        for name, model in models.items():
            os.environ["NLSTM_CPP"] = env[name]
            t0 = clock()
            out = model(x)[0]
            t1 = clock()
            out.sum().backward()
            t2 = clock()
            with torch.no_grad():
                model(x)
            t3 = clock()
            if r:
                times[name].append((t1 - t0, t2 - t1, t3 - t2))
    return {k: [1e3 * statistics.median(t[i] for t in v) for i in range(3)] for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=None, help="B,T,H (several allowed)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    try:
        sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes] if args.sizes else SIZES
        if any(len(s) != 3 or min(s) < 1 for s in sizes):
            raise ValueError
    except ValueError:
        p.error("--sizes takes B,T,H triples of positive integers")
    torch.set_num_threads(1)
    if cpp.kernels() is None:
        p.error(f"the C++ loops are not available here: {cpp.build_failure()}")
    print(f"# CPU ms, 1 thread, median of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    print("| B, T, H | loops | forward | backward | train (f+b) vs LSTM | no-grad | no-grad vs LSTM |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for B, T, H in sizes:
        med = measure(B, T, H, args.rounds)
        lf, lb, li = med["LSTM x2"]
        for name, (f, b, i) in med.items():
            print(f"| {B}, {T}, {H} | {name} | {f:.1f} | {b:.1f} | {(lf + lb) / (f + b):.2f}x | {i:.1f} | "
                  f"{li / i:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
