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


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, L) with row b = ``data[b*L:(b+1)*L]``, L = len(data) // B; the remainder is dropped."""
    _check_stream(data, batch_size)
    length = data.numel() // batch_size
    if length < 2:
        raise ValueError(f"{data.numel()} tokens are too few for {batch_size} rows of >= 2")
    return data[: batch_size * length].reshape(batch_size, length).contiguous()


def batchify_padded(data: torch.Tensor, batch_size: int, pad_value: int = -100) -> torch.Tensor:
    """(B, L + 1) with row b = ``data[b*L : b*L + L + 1]`` (rows overlap by one symbol),
    L = ceil((len(data) - 1) / B), padded at the end with ``pad_value``; keeps every symbol.

    Column 0 holds inputs only; columns 1..L of all rows together are ``data[1:]`` exactly once
    (plus padding). See the module docstring for why the rows overlap.
    """
    _check_stream(data, batch_size)
    if pad_value >= 0:
        raise ValueError("pad_value must be negative so it can never be a real token id")
    n = data.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens (one input, one target)")
    length = -(-(n - 1) // batch_size)
    padded = torch.full((batch_size * length + 1,), pad_value, dtype=data.dtype)
    padded[:n] = data
    starts = torch.arange(batch_size) * length
    cols = torch.arange(length + 1)
    return padded[starts[:, None] + cols[None, :]]


class StreamBatches:
    """The (x, y) windows of a token stream, with random access for resuming.

    ``batches[i]`` is window i: ``x = rows[:, i*bptt : i*bptt + T]``, ``y`` the same columns
    shifted by one, T = ``bptt`` except for a shorter last window. Windows are independent
    tensors (contiguous copies), so a trainer may modify them.
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
            self.rows = batchify_padded(data, batch_size, pad_value)
            self._inputs = self.rows.masked_fill(self.rows == pad_value, 0)
            self.num_tokens = int((self.rows[:, 1:] != pad_value).sum())
        else:
            self.rows = batchify(data, batch_size)
            self._inputs = self.rows
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
        x = self._inputs[:, start : start + t].contiguous()
        y = self.rows[:, start + 1 : start + 1 + t].contiguous()
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"StreamBatches(batches={len(self)}, batch_size={self.batch_size}, "
            f"bptt={self.bptt}, pad={self.pad}, num_tokens={self.num_tokens})"
        )
