"""A direct probe of long-range memory (the paper's second claim) on the synthetic corpus.

Overall BPC mixes easy local structure with the one long-range dependency the synthetic corpus
plants: which closing bracket ends a span is fixed by its opener ``dependency_length``
characters back (``nlstm.data.synthetic``). ``closer_bpc`` scores only that choice: at every
position whose next symbol is a closer, the model's probabilities are renormalised over the
closer types, and the bits of the right one are averaged. *When* a span closes is random by
design and is left out, so the measure isolates memory: a model that remembers the opener pays
~0 bits, one with no memory of it pays log2(number of bracket types) at best.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nlstm.data.vocab import Vocabulary

__all__ = ["closer_bits", "closer_bpc", "no_memory_bound"]


def no_memory_bound(brackets: str = "()[]{}<>") -> float:
    """Bits per closer of a model that knows a closer comes but not which: log2(types)."""
    return math.log2(len(brackets) // 2)


def closer_bits(logits: Tensor, targets: Tensor, closer_ids: Tensor) -> Tensor:
    """Bits of the right closer, the distribution renormalised over the closers, at every
    position whose target is a closer. ``logits`` (..., vocab), ``targets`` (...)."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    at_closer = torch.isin(targets, closer_ids)
    closer_logits = logits[at_closer][:, closer_ids].float()
    right = (targets[at_closer].unsqueeze(1) == closer_ids.unsqueeze(0)).float().argmax(dim=1)
    return torch.nn.functional.cross_entropy(closer_logits, right, reduction="none") / math.log(2)


@torch.no_grad()
def closer_bpc(model: nn.Module, tokens: Tensor, vocab: Vocabulary, brackets: str = "()[]{}<>",
               window: int = 256) -> float:
    """Mean ``closer_bits`` of ``model`` reading ``tokens`` (1-d) as one stream, the recurrent
    state carried across windows. NaN if the text has no closer."""
    closer_ids = torch.cat([vocab.encode(c) for c in brackets[1::2] if c in vocab]).to(torch.long)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state, bits = None, []
    tokens = tokens.to(torch.long)
    for start in range(0, len(tokens) - 1, window):
        x = tokens[start:start + window].to(device).unsqueeze(0)
        y = tokens[start + 1:start + window + 1].to(device).unsqueeze(0)
        x = x[:, :y.shape[1]]
        logits, state = model(x, state)[:2]
        bits.append(closer_bits(logits, y, closer_ids.to(device)).cpu())
    model.train(was_training)
    values = torch.cat(bits) if bits else torch.empty(0)
    return float(values.mean()) if len(values) else math.nan
