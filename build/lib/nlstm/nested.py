"""``NestedLSTM``: the Nested LSTM cell run over a sequence, with state in and out.

Two implementations compute the same function:
- ``impl="reference"``: a per-step Python loop over :func:`nlstm.cell.nested_lstm_step` through
  autograd. Slow, obviously correct, and the oracle that the fast path is tested against.
- ``impl="fused"`` (default): :mod:`nlstm.fused`, a custom autograd Function with a hand-written
  backward through time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlstm.cell import NestedLSTMCell, NestedState, nested_lstm_step
from nlstm.fused import fused_nested_lstm

IMPLEMENTATIONS = ("fused", "reference")


class NestedLSTM(NestedLSTMCell):
    """A depth-D Nested LSTM layer over whole sequences.

    It owns exactly the parameters of :class:`NestedLSTMCell` (``weight_ih_l{k}``,
    ``weight_hh_l{k}``, ``bias_l{k}``) and adds the time loop. The state is
    ``(h, (c^0, ..., c^{D-1}))``, each ``(batch, hidden)``, so truncated BPTT can carry it.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        depth: int = 2,
        batch_first: bool = True,
        candidate_activation: str = "identity",
        forget_bias: float = 1.0,
        impl: str = "fused",
    ) -> None:
        super().__init__(input_size, hidden_size, depth, candidate_activation, forget_bias)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.batch_first = batch_first
        self.impl = impl

    def forward(
        self, x: Tensor, state: NestedState | None = None, return_memories: bool = False
    ) -> tuple[Tensor, NestedState] | tuple[Tensor, NestedState, tuple[Tensor, ...]]:
        """Run the sequence ``x`` (batch, time, input) or (time, batch, input).

        Returns ``(output, state)``, or ``(output, state, memories)`` with ``return_memories``,
        where ``memories[k]`` holds level k's memory c^k at every step, shaped like ``output``.
        """
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(f"expected a 3-d input with {self.input_size} features, got shape {tuple(x.shape)}")
        x_tm = x.transpose(0, 1) if self.batch_first else x  # time-major inside
        if state is None:
            state = self.initial_state(x_tm.shape[1], x.device, x.dtype)
        if self.impl == "fused":
            out, state, memories = fused_nested_lstm(
                x_tm, state, self.weights_ih, self.weights_hh, self.biases,
                self.candidate_activation, return_memories,
            )
        else:
            out, state, memories = self._reference(x_tm, state, return_memories)
        if self.batch_first:
            out = out.transpose(0, 1)
            memories = tuple(m.transpose(0, 1) for m in memories) if memories is not None else None
        return (out, state, memories) if return_memories else (out, state)

    def _reference(
        self, x_tm: Tensor, state: NestedState, return_memories: bool
    ) -> tuple[Tensor, NestedState, tuple[Tensor, ...] | None]:
        outputs, traces = [], []
        for x_t in x_tm.unbind(0):
            h, state = nested_lstm_step(
                x_t, state, self.weights_ih, self.weights_hh, self.biases, self.candidate_activation
            )
            outputs.append(h)
            if return_memories:
                traces.append(state[1])
        memories = tuple(torch.stack(level) for level in zip(*traces, strict=True)) if return_memories else None
        return torch.stack(outputs), state, memories

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch_first={self.batch_first}, impl={self.impl!r}"
