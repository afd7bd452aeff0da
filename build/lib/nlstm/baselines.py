"""Stacked and single-layer LSTM baselines, backed by ``torch.nn.LSTM`` (so cuDNN / oneDNN).

Bias convention: ``torch.nn.LSTM`` keeps two bias vectors per layer (``b_ih`` and ``b_hh``) that
only ever appear as their sum. The Nested LSTM has one bias per level, so for an exact parameter
match the baseline keeps ``bias_ih_l{k}`` as its single trainable bias and turns ``bias_hh_l{k}``
into a constant zero buffer. A D-layer stacked LSTM and a depth-D Nested LSTM of the same width
then have exactly the same parameter count (see :mod:`nlstm.params`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nlstm.cell import init_lstm_weights

LSTMState = tuple[Tensor, Tensor]  # torch's (h, c), each (num_layers, batch, hidden)


class StackedLSTM(nn.Module):
    """``num_layers`` LSTM layers on top of each other; ``num_layers=1`` is the single-layer baseline.

    Same interface as :class:`nlstm.NestedLSTM`: ``forward(x, state=None, return_memories=False)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 2,
        batch_first: bool = True,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.batch_first = batch_first
        self.forget_bias = forget_bias
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=batch_first)
        for k in range(num_layers):  # one bias per layer: b_hh becomes a constant zero
            name = f"bias_hh_l{k}"
            zeros = torch.zeros_like(self.lstm._parameters.pop(name)).detach()
            self.lstm.register_buffer(name, zeros, persistent=False)
        self.lstm._init_flat_weights()
        self.reset_parameters()

    @property
    def weights_ih(self) -> list[Tensor]:
        return [getattr(self.lstm, f"weight_ih_l{k}") for k in range(self.num_layers)]

    @property
    def weights_hh(self) -> list[Tensor]:
        return [getattr(self.lstm, f"weight_hh_l{k}") for k in range(self.num_layers)]

    @property
    def biases(self) -> list[Tensor]:
        return [getattr(self.lstm, f"bias_ih_l{k}") for k in range(self.num_layers)]

    def reset_parameters(self) -> None:
        init_lstm_weights(self.weights_ih, self.weights_hh, self.biases, self.forget_bias)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> LSTMState:
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
        return zeros, zeros.clone()

    def forward(
        self, x: Tensor, state: LSTMState | None = None, return_memories: bool = False
    ) -> tuple[Tensor, LSTMState] | tuple[Tensor, LSTMState, tuple[Tensor, ...]]:
        """``return_memories`` adds each layer's cell state at every step, ``(batch, time, hidden)``
        per layer (time-major if ``batch_first=False``); it runs step by step, for analysis only."""
        if not return_memories:
            return self.lstm(x, state)
        time_dim = 1 if self.batch_first else 0
        outputs, traces = [], []
        for x_t in x.split(1, dim=time_dim):
            out, state = self.lstm(x_t, state)
            outputs.append(out)
            traces.append(state[1])  # (num_layers, batch, hidden)
        cells = torch.stack(traces, dim=time_dim + 1)  # (layers, B, T, n) or (layers, T, B, n)
        return torch.cat(outputs, dim=time_dim), state, tuple(cells.unbind(0))

    def extra_repr(self) -> str:
        return f"one bias per layer, forget_bias={self.forget_bias}"
