"""The fused Nested LSTM: the whole sequence in one custom autograd Function.

It computes the same function as the per-step reference (:func:`nlstm.cell.nested_lstm_step` in
a loop, ``NestedLSTM(impl="reference")``); ``tests/test_fused.py`` binds the two in float64 to
1e-10, gradients included. What makes it fast (numbers and profiles: ``docs/benchmarks.md``):

- **Hoisting, one GEMM per level per step.** The outer input projection ``x_t W_ih^0 + b^0`` of
  all steps is one GEMM before the loop; each step adds ``h_{t-1} W_hh^0``. Level k >= 1 does one
  GEMM per step, ``[u^k ; r^k] [W_ih^k  W_hh^k]^T + b^k``, the weights concatenated once per call.
- **oneDNN GEMMs on CPU (float32)**, with the step weights prepacked once per call (``gemm``).
- **A hand-written backward through time** that keeps only the post-activation gates, the
  memories, each level's GEMM input and two (T, B, n) helpers per level, and computes the weight
  gradients after the loop as one GEMM per level over all steps.
- **A layout for the element-wise work** (rows ``[i, f, o, g | c_prev]``) and **no tanh kernel**
  (``tanh(z) = 1 - 2 sigmoid(-2z)``): see ``forward`` and ``backward``.
- **No per-call allocation or view-making in steady state** (``buffers``).
- **Flush-to-zero** on every thread, and one thread at small widths (``cpu_env``).

Inference (grad mode off, or nothing requires grad) runs the same forward without the helpers
the backward needs; a single step (T = 1, generation) skips the weight preparation and works on
the parameters as they are, in pooled scratch (``inference``). Nothing is cached between calls
but scratch memory, each call's leased to it alone: no call can see stale weights (whatever
wrote them: fused/foreach optimizers, ``p.data``, ``load_state_dict``) or another thread's
buffers.

One concern per module, in the order a call uses them:

- ``inputs``: the Function's flat argument list and the checks;
- ``gemm``: the GEMM backend choice and the gate row order;
- ``weights``: the weights in the kernel's layout (:class:`~nlstm.fused.weights.PackedWeights`);
- ``buffers``: the per-call buffers with their per-step views, the lock-protected pool and leases;
- ``cpu_env``: flush-to-zero and the serial small-width path;
- ``forward`` and ``backward``: the two time loops (and the gradients after the backward one);
- ``cpp``: the same two loops in C++ (``nlstm/csrc/fused_cpu.cpp``) for CPU tensors, compiled on
  first use where a compiler exists, the Python loops otherwise (``NLSTM_CPP``);
- ``inference``: the no-grad paths;
- ``function``: the autograd Function and :func:`fused_nested_lstm`, the entry the model calls.

The code is device-agnostic: the same Function runs on CUDA tensors (the generic GEMM path).
CUDA-only extras (CUDA-graph replay of both time loops) live in :mod:`nlstm.fused_cuda`,
imported lazily and only for CUDA tensors; it builds on the public names of these modules.
"""

from nlstm.fused.buffers import empty_cache
from nlstm.fused.function import FusedNestedLSTMFunction, fused_nested_lstm
from nlstm.fused.gemm import gemm_backend

__all__ = ["FusedNestedLSTMFunction", "empty_cache", "fused_nested_lstm", "gemm_backend"]
