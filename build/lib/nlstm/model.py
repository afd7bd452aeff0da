"""``CharLM``: a character-level language model around any of the recurrent cores.

embedding (or one-hot) -> recurrent core (Nested LSTM | stacked LSTM | single LSTM) -> dropout
-> linear decoder -> softmax. The core is the only thing that changes between the arms of a
comparison; everything around it is shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlstm.baselines import StackedLSTM
from nlstm.nested import NestedLSTM
from nlstm.params import check_arch, lm_parameters


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`CharLM` (stored next to checkpoints and results)."""

    vocab_size: int
    arch: str = "nlstm"  # "nlstm" | "stacked" | "single"
    depth: int = 2  # nesting depth for "nlstm", number of layers for "stacked", 1 for "single"
    width: int = 256
    embedding_dim: int | None = 128  # None: one-hot input (no embedding parameters)
    dropout: float = 0.0
    candidate_activation: str = "identity"  # the outer level's candidate; an ablation switch
    forget_bias: float = 1.0
    impl: str = "fused"  # Nested LSTM kernel: "fused" | "reference"

    def __post_init__(self) -> None:
        check_arch(self.arch, self.depth)
        if self.vocab_size < 2 or self.width < 1:
            raise ValueError(f"vocab_size must be >= 2 and width >= 1, got {self.vocab_size}, {self.width}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1 or None (one-hot), got {self.embedding_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_core(cfg: ModelConfig, input_size: int) -> nn.Module:
    if cfg.arch == "nlstm":
        return NestedLSTM(
            input_size, cfg.width, depth=cfg.depth, batch_first=True,
            candidate_activation=cfg.candidate_activation, forget_bias=cfg.forget_bias, impl=cfg.impl,
        )
    return StackedLSTM(input_size, cfg.width, num_layers=cfg.depth, batch_first=True, forget_bias=cfg.forget_bias)


class CharLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        input_size = cfg.vocab_size if cfg.embedding_dim is None else cfg.embedding_dim
        self.embedding = None if cfg.embedding_dim is None else nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.core = build_core(cfg, input_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.width, cfg.vocab_size)
        # The embedding keeps torch's N(0, 1) init: with the Glorot input kernel behind it, the input
        # then moves the gates from the first step (N(0, 0.1) left them near-blind to the input and
        # cost every architecture, the nested most, hundreds of steps on PTB; see the README).
        nn.init.zeros_(self.decoder.bias)

    def embed(self, tokens: Tensor) -> Tensor:
        tokens = tokens.long()  # corpora hold tokens in the smallest dtype that fits (uint8 for characters)
        if self.embedding is None:
            return F.one_hot(tokens, self.cfg.vocab_size).to(self.decoder.weight.dtype)
        return self.embedding(tokens)

    def forward(self, tokens: Tensor, state: Any = None, return_memories: bool = False):
        """``tokens`` (batch, time) -> ``(logits (batch, time, vocab), state)``; with
        ``return_memories`` also the core's per-level (nested) or per-layer (stacked) cell traces."""
        result = self.core(self.embed(tokens), state, return_memories=return_memories)
        logits = self.decoder(self.dropout(result[0]))
        return (logits, *result[1:])

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def expected_num_params(self) -> int:
        """The closed-form count of :mod:`nlstm.params` for this configuration."""
        c = self.cfg
        return lm_parameters(c.arch, c.depth, c.width, c.vocab_size, c.embedding_dim)

    @torch.no_grad()
    def generate(
        self,
        prefix: Tensor,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue the token ids ``prefix`` (1-d) by ``n`` sampled tokens; returns only the new ones.

        The prefix is read in one pass, then one step at a time, carrying the state.
        ``temperature=0`` is greedy decoding."""
        if prefix.dim() != 1 or prefix.numel() == 0:
            raise ValueError("prefix must be a non-empty 1-d tensor of token ids")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        was_training = self.training
        self.eval()
        device = self.decoder.weight.device
        logits, state = self(prefix.to(device).unsqueeze(0))
        out = torch.empty(n, dtype=torch.long, device=device)
        for t in range(n):
            last = logits[0, -1]
            if temperature == 0:
                token = last.argmax()
            else:
                token = torch.multinomial(F.softmax(last / temperature, dim=-1), 1, generator=generator)[0]
            out[t] = token
            logits, state = self(out[t : t + 1].unsqueeze(0), state)
        self.train(was_training)
        return out
