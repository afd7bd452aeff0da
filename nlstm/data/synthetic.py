"""A synthetic character corpus with a controlled long-range dependency.

Why it exists: real corpora mix many dependency lengths, so they cannot show *which* memory
carries long-range information. This corpus has exactly one kind of long-range structure whose
distance is a knob, while everything else is easy to learn, so a model's loss at the closing
brackets (and its memory traces there) isolates the long-range part.

Design, and why each choice:
- Text is words from a small fixed lexicon (``n_words`` random lowercase words, lengths
  ``min_word_len``..``max_word_len``) separated by single spaces. Once the first letters of a
  word are seen, the rest is determined, so a model quickly gets far below the unigram entropy:
  the training curve shows learning within a few hundred steps, and a smoke run can check it.
- Bracket spans are interspersed as their own space-separated items: an opener drawn uniformly
  from several types (``( [ { <`` by default) and, later, its matching closer. The *type* of
  the closer is fixed by the opener many steps back: a true long-range dependency that no
  local context reveals. With k types, a model without that memory pays log2(k) bits per
  closer; one with it pays ~0.
- The span length (characters from opener to closer) of an outermost span is a target ``L``
  uniform on [dependency_length/2, 3*dependency_length/2], shifted down by the mean wait for
  the word in progress, so its mean is ``dependency_length`` (measured: within ~5% for
  10..200). It is random so that *when* to close is uncertain while *which* closer is
  certain: the model cannot count characters instead of remembering.
- Spans nest up to ``max_nesting`` deep (an inner span is cut to end no later than its
  enclosing one), so the model needs a stack, not one register: the closer of an outer span
  depends on an opener further back than the inner span's.
- Every split starts and ends with all spans closed (the last items of a split are closers then
  words, cut to the exact length), so each split parses on its own.
- Determinism: each split has its own ``random.Random`` seeded from ``(seed, split name)``
  (string seeds hash with SHA-512, independent of PYTHONHASHSEED), and only ``random()`` is
  used, whose stream Python keeps stable across versions. So the same config gives identical
  tensors anywhere, a different seed gives different text, and changing ``train_chars`` does
  not change the valid/test text.
- Speed: a plain Python loop over items (~45k for the default 240k characters) takes tens of
  milliseconds.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, dataclass
from typing import ClassVar

from nlstm.data.corpora import Corpus
from nlstm.data.vocab import Vocabulary

__all__ = ["SyntheticConfig", "bracket_spans", "synthetic_corpus", "synthetic_texts"]

# Upper bounds: generation is a Python loop (~1 s and ~100 MB per 10^7 characters), so a split of
# 10^11 characters would run out of memory after minutes instead of being refused. 10^8 is the
# size of the largest real corpora here (enwik8, text8). A word length of 10^6 would make even the
# count of possible words (sum of 26^k) take forever.
MAX_SPLIT_CHARS = 100_000_000
MAX_WORD_LEN = 32
MAX_NESTING = 100
MAX_BRACKETS = 64


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    train_chars: int = 200_000
    valid_chars: int = 20_000
    test_chars: int = 20_000
    dependency_length: int = 40
    max_nesting: int = 3
    n_words: int = 24
    min_word_len: int = 2
    max_word_len: int = 7
    open_prob: float = 0.1  # chance, at each item boundary, of opening a span (if depth allows)
    brackets: str = "()[]{}<>"  # opener/closer pairs

    # (lowest, highest) of each integer option, checked before anything is generated
    BOUNDS: ClassVar[dict[str, tuple[int, int]]] = {
        "train_chars": (1, MAX_SPLIT_CHARS), "valid_chars": (1, MAX_SPLIT_CHARS), "test_chars": (1, MAX_SPLIT_CHARS),
        "dependency_length": (2, MAX_SPLIT_CHARS), "max_nesting": (0, MAX_NESTING),
        "min_word_len": (1, MAX_WORD_LEN), "max_word_len": (1, MAX_WORD_LEN)}

    @classmethod
    def bound_problem(cls, name: str, value: int) -> str | None:
        """'must be in [low, high], got value' if ``value`` is out of ``name``'s bounds, else None."""
        if name not in cls.BOUNDS:
            return None
        low, high = cls.BOUNDS[name]
        return None if low <= value <= high else f"{name} must be in [{low:,}, {high:,}], got {value:,}"

    def __post_init__(self) -> None:
        for name in self.BOUNDS:
            problem = self.bound_problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        if not self.min_word_len <= self.max_word_len:
            raise ValueError("need 1 <= min_word_len <= max_word_len")
        possible = sum(26**k for k in range(self.min_word_len, self.max_word_len + 1))
        if not 1 <= self.n_words <= min(possible, 10_000):
            raise ValueError(f"n_words must be in [1, {min(possible, 10_000)}]")
        if not 0.0 <= self.open_prob < 1.0:
            raise ValueError("open_prob must be in [0, 1)")
        b = self.brackets
        if (len(b) < 2 or len(b) > MAX_BRACKETS or len(b) % 2 or len(set(b)) != len(b)
                or set(b) & set(string.ascii_lowercase + " ")):
            raise ValueError(f"brackets must be distinct opener/closer pairs (at most {MAX_BRACKETS} characters), "
                             "not letters or space")

    @property
    def pairs(self) -> dict[str, str]:
        """opener -> closer."""
        return dict(zip(self.brackets[0::2], self.brackets[1::2], strict=True))


def _rng(cfg: SyntheticConfig, stream: str) -> random.Random:
    return random.Random(f"nlstm-synthetic:{cfg.seed}:{stream}")


def _lexicon(cfg: SyntheticConfig) -> list[str]:
    rng = _rng(cfg, "lexicon")
    letters = string.ascii_lowercase
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < cfg.n_words:
        n = cfg.min_word_len + int(rng.random() * (cfg.max_word_len - cfg.min_word_len + 1))
        w = "".join(letters[int(rng.random() * 26)] for _ in range(n))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _generate(cfg: SyntheticConfig, lexicon: list[str], n: int, rng: random.Random) -> str:
    pairs = list(cfg.pairs.items())
    # L uniform on [D/2, 3D/2] (mean D), minus the mean overshoot past the target of a
    # renewal process over the lexicon's items (word + space): the closer waits for the word
    # in progress, so this keeps the mean opener-closer distance at D.
    sizes = [len(w) + 1 for w in lexicon]
    overshoot = round(sum(x * (x - 1) for x in sizes) / (2 * sum(sizes)))
    lo = max(1, cfg.dependency_length // 2 - overshoot)
    width = cfg.dependency_length + 1
    # Stop opening/continuing early enough that closing every open span still fits in n.
    margin = max(cfg.max_word_len + 1, 4)
    out: list[str] = []
    pos = 0
    stack: list[tuple[str, int]] = []  # (closer, position at or after which it is emitted)
    rand = rng.random
    while pos + 2 * len(stack) + margin < n:
        if stack and pos >= stack[-1][1]:
            out.append(stack.pop()[0] + " ")
            pos += 2
        elif len(stack) < cfg.max_nesting and rand() < cfg.open_prob:
            opener, closer = pairs[int(rand() * len(pairs))]
            close_at = pos + lo + int(rand() * width)
            if stack:
                close_at = min(close_at, stack[-1][1])
            out.append(opener + " ")
            pos += 2
            stack.append((closer, close_at))
        else:
            w = lexicon[int(rand() * len(lexicon))]
            out.append(w + " ")
            pos += len(w) + 1
    while stack:
        out.append(stack.pop()[0] + " ")
        pos += 2
    while pos < n:
        w = lexicon[int(rand() * len(lexicon))]
        out.append(w + " ")
        pos += len(w) + 1
    return "".join(out)[:n]


def synthetic_texts(cfg: SyntheticConfig) -> dict[str, str]:
    """The raw train/valid/test texts (useful for inspection and analysis)."""
    lexicon = _lexicon(cfg)
    sizes = {"train": cfg.train_chars, "valid": cfg.valid_chars, "test": cfg.test_chars}
    return {split: _generate(cfg, lexicon, n, _rng(cfg, split)) for split, n in sizes.items()}


def synthetic_vocabulary(cfg: SyntheticConfig) -> Vocabulary:
    """Lexicon letters, space and every bracket: a function of the config, not of the text."""
    letters = set("".join(_lexicon(cfg)))
    brackets = set(cfg.brackets) if cfg.max_nesting > 0 else set()
    return Vocabulary.from_symbols(letters | brackets | {" "})


def synthetic_corpus(cfg: SyntheticConfig | None = None) -> Corpus:
    """Generate the corpus described in the module docstring (deterministic for ``cfg``)."""
    cfg = cfg or SyntheticConfig()
    texts = synthetic_texts(cfg)
    vocab = synthetic_vocabulary(cfg)
    return Corpus(
        name="synthetic",
        vocab=vocab,
        train=vocab.encode(texts["train"]),
        valid=vocab.encode(texts["valid"]),
        test=vocab.encode(texts["test"]),
        source="synthetic:" + json.dumps(asdict(cfg), sort_keys=True, separators=(",", ":")),
        checksums={},
    )


def bracket_spans(text: str, brackets: str = "()[]{}<>") -> list[tuple[int, int, int]]:
    """Parse ``text``'s brackets; return (opener index, closer index, depth) per span.

    Raises ValueError on a closer that does not match the innermost open span, or on spans
    left open. Used by the tests and to locate the long-range targets for analysis.
    """
    openers = dict(zip(brackets[0::2], brackets[1::2], strict=True))
    closers = set(openers.values())
    stack: list[tuple[int, str]] = []
    spans: list[tuple[int, int, int]] = []
    for i, ch in enumerate(text):
        if ch in openers:
            stack.append((i, openers[ch]))
        elif ch in closers:
            if not stack or stack[-1][1] != ch:
                raise ValueError(f"unmatched closer {ch!r} at {i}")
            start, _ = stack.pop()
            spans.append((start, i, len(stack)))
    if stack:
        raise ValueError(f"{len(stack)} span(s) left open, first at {stack[0][0]}")
    return spans
