"""Closed-form parameter counts and budget matching.

With input width m, width n and one bias vector per level/layer (spec, "Parameter identity")::

    core(D, n) = 4n(m + n + 1) + (D - 1)(8n^2 + 4n)      for the Nested LSTM AND the stacked LSTM

so nesting and stacking at equal (width, depth) are parameter-matched by construction; a
single-layer LSTM must be wider to match. The char LM adds an embedding (V x E, or nothing for
one-hot input, where m = V) and a decoder (n V + V).

Width alone cannot hit a budget to 1 %: one more unit of width moves the count by about 2/n of
it (1.6 % at n = 64). :func:`width_for_budget` therefore solves the width and then moves the
embedding size by a few units (each worth V + 4n parameters) to land within about 0.2 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ARCHITECTURES = ("nlstm", "stacked", "single")


def check_arch(arch: str, depth: int) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if arch == "single" and depth != 1:
        raise ValueError(f"a single-layer LSTM has depth 1, got depth={depth}")


def core_parameters(arch: str, depth: int, width: int, input_size: int) -> int:
    """Parameters of the recurrent core (identical for 'nlstm' and 'stacked' by design)."""
    check_arch(arch, depth)
    n, m = width, input_size
    return 4 * n * (m + n + 1) + (depth - 1) * (8 * n * n + 4 * n)


def lm_parameters(arch: str, depth: int, width: int, vocab_size: int, embedding_dim: int | None) -> int:
    """Parameters of :class:`nlstm.CharLM`; equals ``sum(p.numel() for p in model.parameters())``."""
    embed = 0 if embedding_dim is None else vocab_size * embedding_dim
    input_size = vocab_size if embedding_dim is None else embedding_dim
    decoder = width * vocab_size + vocab_size
    return embed + core_parameters(arch, depth, width, input_size) + decoder


@dataclass(frozen=True)
class BudgetSolution:
    """The architecture that best matches a parameter budget, with what it actually achieves."""

    arch: str
    depth: int
    width: int
    embedding_dim: int | None
    params: int
    budget: int

    @property
    def relative_error(self) -> float:
        return (self.params - self.budget) / self.budget


def width_for_budget(
    arch: str,
    depth: int,
    budget: float,
    vocab_size: int,
    embedding_dim: int | None = 128,
    adjust_embedding: bool = True,
) -> BudgetSolution:
    """The width (and, if allowed, embedding size near ``embedding_dim``) whose char-LM parameter
    count is closest to ``budget``. With one-hot input (``embedding_dim=None``) only the width moves."""
    check_arch(arch, depth)
    budget = int(round(budget))

    def count(width: int, emb: int | None) -> int:
        return lm_parameters(arch, depth, width, vocab_size, emb)

    # count(n) = a n^2 + b n + c for a fixed embedding: solve for the real root, then look around it.
    c = count(0, embedding_dim)
    a_plus_b, four_a_plus_2b = count(1, embedding_dim) - c, count(2, embedding_dim) - c
    a = (four_a_plus_2b - 2 * a_plus_b) / 2
    b = a_plus_b - a
    root = (-b + math.sqrt(b * b + 4 * a * max(budget - c, 0))) / (2 * a)
    widths = {max(1, math.floor(root)), max(1, math.ceil(root))}
    candidates = []
    for width in sorted(widths):
        emb = embedding_dim
        if embedding_dim is not None and adjust_embedding:
            per_unit = vocab_size + 4 * width  # one more embedding unit: a column of E and of W_ih
            emb = max(1, embedding_dim + round((budget - count(width, embedding_dim)) / per_unit))
        candidates.append(
            (abs(count(width, emb) - budget), abs((emb or 0) - (embedding_dim or 0)), -width, width, emb)
        )
    *_, width, emb = min(candidates)
    if count(width, emb) > 2 * budget:
        raise ValueError(f"budget {budget} is too small for a {arch} of depth {depth} (vocab {vocab_size})")
    return BudgetSolution(arch, depth, width, emb, count(width, emb), budget)
