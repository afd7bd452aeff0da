"""The Nested LSTM cell (Moniz & Krueger, "Nested LSTMs", ACML 2017, arXiv 1801.10308).

One time step, written as plainly as the equations in ``shared/notes/nlstm-spec.md`` so that a
reader can check it line by line. Everything faster (the fused sequence kernel) is tested
against :func:`nested_lstm_step`.

Level 0 is the outer LSTM; levels 1..D-1 are nested inside it, all of width n::

    gates at level k   [i,f,g,o]^k = W_ih^k u^k + W_hh^k r^k + b^k
                       i,f,o = sigmoid;  g = act_k(.)   act_0 = identity (default), act_{k>=1} = tanh
    level k+1 input    u^{k+1} = i^k * g^k          (what an LSTM would have added)
    level k+1 "prev h" r^{k+1} = f^k * c^k_{t-1}    (what an LSTM would have kept)
    memory             c^k_t = h^{k+1}_t  (k < D-1);  c^{D-1}_t = f c^{D-1}_{t-1} + i g  (innermost)
    output             h^k_t = o^k * tanh(c^k_t);  the cell's output is h_t = h^0_t

With D = 1 this is exactly ``torch.nn.LSTMCell`` (with one bias vector instead of two): the outer
candidate is then also the innermost one, whose i*g goes straight into the memory, so it keeps
tanh; ``candidate_activation`` only chooses act_0 when there is a level inside to receive it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

CANDIDATE_ACTIVATIONS = ("identity", "tanh")

# The recurrent state: the outer hidden output h and one memory per level (c^0 ... c^{D-1}).
NestedState = tuple[Tensor, tuple[Tensor, ...]]


def nested_lstm_step(
    x: Tensor,
    state: NestedState,
    weights_ih: Sequence[Tensor],
    weights_hh: Sequence[Tensor],
    biases: Sequence[Tensor],
    outer_candidate: str = "identity",
) -> tuple[Tensor, NestedState]:
    """One step of a depth-D Nested LSTM; D = len(weights_ih). Returns (h_t, (h_t, (c^0..c^{D-1})))."""
    h_prev, c_prev = state
    depth = len(weights_ih)
    u, r = x, h_prev
    gates: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for k in range(depth):
        i, f, g, o = (u @ weights_ih[k].t() + r @ weights_hh[k].t() + biases[k]).chunk(4, dim=-1)
        i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
        g = g if (k == 0 and depth > 1 and outer_candidate == "identity") else torch.tanh(g)
        gates.append((i, f, g, o))
        u, r = i * g, f * c_prev[k]  # the next level's input and "previous hidden"
    i, f, g, o = gates[-1]
    c = [torch.empty(0)] * depth
    c[-1] = f * c_prev[-1] + i * g  # the innermost level is a plain LSTM update
    h = o * torch.tanh(c[-1])
    for k in range(depth - 2, -1, -1):  # each outer memory is the output of the level inside it
        c[k] = h
        h = gates[k][3] * torch.tanh(c[k])
    return h, (h, tuple(c))


class NestedLSTMCell(nn.Module):
    """A depth-D Nested LSTM cell with torch's parameter conventions per level.

    Level k owns ``weight_ih_l{k}`` (4n x in_k; in_0 = input_size, in_k = n), ``weight_hh_l{k}``
    (4n x n) and ``bias_l{k}`` (4n), gates ordered i, f, g, o as in ``torch.nn.LSTM``, so level
    weights copy to and from an LSTM (its two biases summed into one).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        depth: int = 2,
        candidate_activation: str = "identity",
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size}, {hidden_size}")
        if candidate_activation not in CANDIDATE_ACTIVATIONS:
            raise ValueError(
                f"candidate_activation must be one of {CANDIDATE_ACTIVATIONS}, got {candidate_activation!r}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.depth = depth
        self.candidate_activation = candidate_activation
        self.forget_bias = forget_bias
        n = hidden_size
        for k in range(depth):
            in_k = input_size if k == 0 else n
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * n, in_k)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * n, n)))
            self.register_parameter(f"bias_l{k}", nn.Parameter(torch.empty(4 * n)))
        self.reset_parameters()

    @property
    def weights_ih(self) -> list[Tensor]:
        return [getattr(self, f"weight_ih_l{k}") for k in range(self.depth)]

    @property
    def weights_hh(self) -> list[Tensor]:
        return [getattr(self, f"weight_hh_l{k}") for k in range(self.depth)]

    @property
    def biases(self) -> list[Tensor]:
        return [getattr(self, f"bias_l{k}") for k in range(self.depth)]

    def reset_parameters(self) -> None:
        """The reference implementations' scheme (spec): Glorot-normal outer input kernel,
        orthogonal recurrent and inner kernels (per gate block), zero biases, forget bias 1."""
        init_lstm_weights(self.weights_ih, self.weights_hh, self.biases, self.forget_bias)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> NestedState:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return zeros, tuple(zeros.clone() for _ in range(self.depth))

    def forward(self, x: Tensor, state: NestedState | None = None) -> tuple[Tensor, NestedState]:
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        return nested_lstm_step(
            x, state, self.weights_ih, self.weights_hh, self.biases, self.candidate_activation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, depth={self.depth}, "
            f"candidate_activation={self.candidate_activation!r}, forget_bias={self.forget_bias}"
        )


@torch.no_grad()
def init_lstm_weights(
    weights_ih: Sequence[Tensor], weights_hh: Sequence[Tensor], biases: Sequence[Tensor], forget_bias: float
) -> None:
    """Shared by the nested and the stacked models so that nesting-vs-stacking differs only in wiring."""
    for k, (w_ih, w_hh, b) in enumerate(zip(weights_ih, weights_hh, biases, strict=True)):
        n = w_hh.shape[1]
        if k == 0:
            fan_in, fan_out = w_ih.shape[1], w_ih.shape[0]
            w_ih.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))
        else:
            for block in w_ih.split(n, dim=0):
                nn.init.orthogonal_(block)
        for block in w_hh.split(n, dim=0):
            nn.init.orthogonal_(block)
        b.zero_()
        b[n : 2 * n].fill_(forget_bias)
