"""closer_bpc against hand counts: the long-range probe of the synthetic corpus."""

from __future__ import annotations

import math

import pytest
import torch

from nlstm import CharLM, ModelConfig
from nlstm.data.synthetic import SyntheticConfig, synthetic_corpus
from nlstm.data.vocab import Vocabulary
from nlstm.probes import closer_bits, closer_bpc, no_memory_bound

TEXT = "ab ( cd [ ef ] gh ) ab { cd } "
VOCAB = Vocabulary.from_symbols(set(TEXT) | set("()[]{}<>"))
CLOSERS = torch.cat([VOCAB.encode(c) for c in ")]}>"])


class Oracle(torch.nn.Module):
    """Predicts, at every position, the symbol that really comes next (probability ~1), or a
    uniform distribution over the vocabulary."""

    def __init__(self, text: str, uniform: bool = False) -> None:
        super().__init__()
        self.next = VOCAB.encode(text[1:] + text[0])
        self.uniform = uniform
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.pos = 0

    def forward(self, x, state=None):
        n = x.shape[1]
        logits = torch.zeros(1, n, len(VOCAB))
        if not self.uniform:
            logits[0, torch.arange(n), self.next[self.pos:self.pos + n]] = 50.0
        self.pos += n
        return logits, state


@pytest.mark.parametrize("window", [3, 7, 100])
def test_a_model_that_always_predicts_the_right_closer_pays_zero_bits(window):
    assert closer_bpc(Oracle(TEXT), VOCAB.encode(TEXT), VOCAB, window=window) == pytest.approx(0.0, abs=1e-6)


def test_a_uniform_model_pays_log2_of_the_number_of_types():
    assert closer_bpc(Oracle(TEXT, uniform=True), VOCAB.encode(TEXT), VOCAB) == pytest.approx(math.log2(4))
    assert no_memory_bound() == 2.0 and no_memory_bound("()[]") == 1.0


def test_closer_bits_by_hand():
    # Two closer positions: ")" given p = (0.5, 0.25, 0.125, 0.125) over ")]}>" -> 1 bit;
    # "]" given the same -> 2 bits; the non-closer target "a" is not scored.
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = torch.full((3, len(VOCAB)), -1e9)
    logits[:, CLOSERS] = probs.log()
    targets = torch.cat([VOCAB.encode(")"), VOCAB.encode("]"), VOCAB.encode("a")])
    assert closer_bits(logits, targets, CLOSERS).tolist() == pytest.approx([1.0, 2.0])


def test_an_untrained_model_on_the_synthetic_corpus_is_near_the_bound():
    torch.manual_seed(0)
    corpus = synthetic_corpus(SyntheticConfig(train_chars=2000, valid_chars=2000, test_chars=2000))
    model = CharLM(ModelConfig(vocab_size=len(corpus.vocab), width=16, embedding_dim=8))
    value = closer_bpc(model, corpus.test, corpus.vocab)
    assert abs(value - 2.0) < 0.2  # random weights know nothing of the openers
