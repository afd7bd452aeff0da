"""Contiguous-stream batching for truncated back-propagation through time.

As in pytorch/examples word_language_model and awd-lstm-lm: the token stream is cut into B
contiguous rows, and a batch is the next ``bptt`` columns of every row, so row b of batch i+1
continues row b of batch i and the recurrent state can be carried across batches. Batches
here are batch-first: ``x`` and ``y`` have shape (B, T), ``y[:, t] = x[:, t + 1]`` of the
underlying rows (the next symbol).

Training (``pad=False``, ``batchify``): the stream's tail that does not fill B equal rows is
dropped (at most B-1 symbols) and the first symbol of each row is never a target. Standard,
and irrelevant for millions of training symbols.

Evaluation (``pad=True``, ``batchify_padded``): BPC must average over *every* symbol, and must
not depend on the evaluation batch size. So the rows overlap by one symbol: row b is
``data[b*L : b*L + L + 1]``, whose targets are ``data[b*L + 1 : b*L + L + 1]``. Every symbol of
the stream except the very first (which has no context) is then a target exactly once, for any
B: ``num_tokens == len(data) - 1``. The last row(s) are padded at the end with ``pad_value``
(-100, ``cross_entropy``'s default ``ignore_index``); in ``x`` padding is replaced by id 0 so
an embedding lookup stays valid, while ``y`` keeps -100 so the loss ignores those positions.
(The cost: each row starts from a fresh state, as the other B-1 rows do in training.)

Memory: a corpus holds its streams in a small dtype (uint8 for characters), possibly
memory-mapped. ``StreamBatches`` keeps its rows in that dtype (training rows are a view of the
stream, not a copy) and converts to int64 one window at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["StreamBatches", "batchify", "batchify_padded"]


def _check_stream(data: torch.Tensor, batch_size: int) -> None:
    if data.dim() != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _padded_row_length(data: torch.Tensor, batch_size: int, pad_value: int) -> tuple[int, int]:
    """(tokens, L) for ``batch_size`` padded rows that keep every symbol: L = ceil((tokens - 1) / B)."""
    _check_stream(data, batch_size)
    if pad_value >= 0:
        raise ValueError("pad_value must be negative so it can never be a real token id")
    n = data.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens (one input, one target)")
    return n, -(-(n - 1) // batch_size)


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, L) with row b = ``data[b*L:(b+1)*L]``, L = len(data) // B; the remainder is dropped."""
    _check_stream(data, batch_size)
    length = data.numel() // batch_size
    if length < 2:
        raise ValueError(f"{data.numel()} tokens are too few for {batch_size} rows of >= 2")
    return data[: batch_size * length].reshape(batch_size, length).contiguous()


def batchify_padded(data: torch.Tensor, batch_size: int, pad_value: int = -100) -> torch.Tensor:
    """(B, L + 1) int64 with row b = ``data[b*L : b*L + L + 1]`` (rows overlap by one symbol),
    L = ceil((len(data) - 1) / B), padded at the end with ``pad_value``; keeps every symbol.

    Column 0 holds inputs only; columns 1..L of all rows together are ``data[1:]`` exactly once
    (plus padding). See the module docstring for why the rows overlap.
    """
    n, length = _padded_row_length(data, batch_size, pad_value)
    padded = torch.full((batch_size * length + 1,), pad_value, dtype=torch.long)
    padded[:n] = data
    starts = torch.arange(batch_size) * length
    cols = torch.arange(length + 1)
    return padded[starts[:, None] + cols[None, :]]


class StreamBatches:
    """The (x, y) windows of a token stream, with random access for resuming.

    ``batches[i]`` is window i: ``x = rows[:, i*bptt : i*bptt + T]``, ``y`` the same columns
    shifted by one, T = ``bptt`` except for a shorter last window. Windows are independent
    int64 tensors (contiguous copies), so a trainer may modify them. With ``pad=True`` the
    rows are those of ``batchify_padded``; they are stored in the stream's dtype with 0 in the
    padding, and ``y`` gets ``pad_value`` there per window.
    """

    def __init__(
        self, data: torch.Tensor, batch_size: int, bptt: int, pad: bool = False, pad_value: int = -100
    ) -> None:
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1, got {bptt}")
        self.batch_size = batch_size
        self.bptt = bptt
        self.pad = pad
        self.pad_value = pad_value
        if pad:
            n, length = _padded_row_length(data, batch_size, pad_value)
            stream = torch.zeros(batch_size * length + 1, dtype=data.dtype)
            stream[:n] = data
            # row b = stream[b*L : b*L + L + 1]: overlapping rows, a strided view of one padded copy
            self.rows = stream.as_strided((batch_size, length + 1), (length, 1))
            self._length, self._n = length, n
            self.num_tokens = n - 1
        else:
            self.rows = batchify(data, batch_size)
            self.num_tokens = self.rows[:, 1:].numel()
        self._targets_per_row = self.rows.shape[1] - 1

    def __len__(self) -> int:
        return -(-self._targets_per_row // self.bptt)

    def window(self, i: int) -> tuple[int, int]:
        """(start column, length T) of window ``i``."""
        start = i * self.bptt
        return start, min(self.bptt, self._targets_per_row - start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"batch index {i} out of range for {n} batches")
        start, t = self.window(i % n)
        x = self.rows[:, start : start + t].to(torch.long, memory_format=torch.contiguous_format, copy=True)
        y = self.rows[:, start + 1 : start + 1 + t].to(torch.long, memory_format=torch.contiguous_format, copy=True)
        if self.pad:  # a symbol's place in the stream: b*L + column; past the end is padding
            where = torch.arange(self.batch_size)[:, None] * self._length + torch.arange(start + 1, start + 1 + t)
            y.masked_fill_(where >= self._n, self.pad_value)
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"StreamBatches(batches={len(self)}, batch_size={self.batch_size}, "
            f"bptt={self.bptt}, pad={self.pad}, num_tokens={self.num_tokens})"
        )
