"""A frozen symbol <-> id mapping.

Why frozen and sorted: the ids end up inside checkpoints and the corpus fingerprint, so the same
set of symbols must always give the same ids, whatever order the text showed them in and on
whatever machine. A vocabulary is therefore built once (``from_symbols``), never grown, and
serialised explicitly (``to_json``) next to a model.

Encoding has a fast path for character-level text (a ``str`` or ``bytes`` object whose symbols
are single characters): a NumPy lookup table over code points turns 100M characters (text8,
enwik8) into ids in about a second, where a per-symbol dict lookup would take a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Vocabulary"]


@dataclass(frozen=True)
class Vocabulary:
    """Ordered, immutable list of symbols; the id of a symbol is its position.

    ``unk``: symbol that unknown symbols map to when encoding (``None``: unknown raises KeyError).
    ``eos``: name of the end-of-line / end-of-sequence symbol, if the corpus has one.
    Both, when given, must be members of ``symbols``.
    """

    symbols: tuple[str, ...]
    unk: str | None = None
    eos: str | None = None
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        symbols = tuple(self.symbols)
        object.__setattr__(self, "symbols", symbols)
        index = {s: i for i, s in enumerate(symbols)}
        if len(index) != len(symbols):
            raise ValueError("vocabulary symbols must be distinct")
        for role in ("unk", "eos"):
            name = getattr(self, role)
            if name is not None and name not in index:
                raise ValueError(f"{role} symbol {name!r} is not in the vocabulary")
        object.__setattr__(self, "_index", index)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_symbols(cls, symbols: Iterable[str], unk: str | None = None, eos: str | None = None) -> Vocabulary:
        """Vocabulary of the distinct ``symbols`` (plus ``unk``/``eos``), sorted by code point.

        Sorting (rather than first-seen order) makes the ids independent of the text order.
        """
        distinct = set(symbols)
        distinct.update(s for s in (unk, eos) if s is not None)
        return cls(tuple(sorted(distinct)), unk=unk, eos=eos)

    # -- mapping --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._index

    def __getitem__(self, symbol: str) -> int:
        return self._index[symbol]

    def id_of(self, symbol: str) -> int:
        """Id of ``symbol``; unknown symbols give the ``unk`` id, or raise KeyError if none."""
        i = self._index.get(symbol)
        if i is None:
            if self.unk is None:
                raise KeyError(f"symbol {symbol!r} is not in the vocabulary")
            return self._index[self.unk]
        return i

    @property
    def unk_id(self) -> int | None:
        return None if self.unk is None else self._index[self.unk]

    @property
    def eos_id(self) -> int | None:
        return None if self.eos is None else self._index[self.eos]

    def encode(self, symbols: str | bytes | Sequence[str], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """Ids (1-D tensor of ``dtype``, int64 by default) of ``symbols``.

        A ``str`` is read as a sequence of characters, ``bytes`` as a sequence of Latin-1
        characters (one symbol per byte, as for enwik8); both take the vectorised path, which
        writes ``dtype`` directly (100M characters as uint8 never pass through int64).
        Any other sequence is a list of tokens (multi-character tokens such as ``<eos>``).
        """
        if len(self) > torch.iinfo(dtype).max + 1:
            raise ValueError(f"{dtype} cannot hold the ids of {len(self)} symbols")
        if isinstance(symbols, (str, bytes)):
            return torch.from_numpy(self._encode_chars(symbols, torch.empty(0, dtype=dtype).numpy().dtype))
        get = self._index.get
        ids = [get(s, -1) for s in symbols]
        if -1 in ids:  # rare: redo with unk mapping (or a KeyError naming the symbol)
            ids = [self.id_of(s) for s in symbols]
        return torch.tensor(ids, dtype=dtype)

    def _encode_chars(self, text: str | bytes, dtype: np.dtype) -> np.ndarray:
        if isinstance(text, bytes):
            codes = np.frombuffer(text, dtype=np.uint8)
        elif text.isascii():
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        else:
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if codes.size == 0:
            return np.zeros(0, dtype=dtype)
        table_size = int(codes.max()) + 1
        table = np.zeros(table_size, dtype=dtype)
        known = np.zeros(table_size, dtype=bool)
        for s, i in self._index.items():
            if len(s) == 1 and ord(s) < table_size:
                table[ord(s)], known[ord(s)] = i, True
        ids = table[codes]
        if not known.all():
            missing = ~known[codes]
            if missing.any():
                if self.unk is None:
                    bad = chr(int(codes[np.argmax(missing)]))
                    raise KeyError(f"symbol {bad!r} is not in the vocabulary")
                ids[missing] = self._index[self.unk]
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Symbols of ``ids`` (a tensor of any shape is flattened)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return [self.symbols[i] for i in ids]

    # -- serialisation --------------------------------------------------------------------

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): also the vocabulary's hash input."""
        data = {"symbols": list(self.symbols), "unk": self.unk, "eos": self.eos}
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        data = json.loads(text)
        return cls(tuple(data["symbols"]), unk=data.get("unk"), eos=data.get("eos"))
