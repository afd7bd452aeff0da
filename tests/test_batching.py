"""Tests of contiguous-stream batching (truncated BPTT, batch-first windows).

Most tests batch ``torch.arange(n)``: every token is unique and the target of input ``v`` is
``v + 1``, so alignment, coverage and duplication are checked exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nlstm.data import StreamBatches, batchify, batchify_padded


def test_batchify_rows_are_contiguous_chunks() -> None:
    data = torch.arange(103)
    rows = batchify(data, 4)
    assert rows.shape == (4, 25) and rows.dtype == torch.long
    for b in range(4):
        assert torch.equal(rows[b], torch.arange(b * 25, b * 25 + 25))
    with pytest.raises(ValueError):
        batchify(torch.arange(7), 4)  # rows of 1 token have no target
    with pytest.raises(ValueError):
        batchify(torch.arange(12).view(3, 4), 2)


def test_stream_batches_shapes_shift_and_continuity() -> None:
    data = torch.arange(1000)
    sb = StreamBatches(data, batch_size=4, bptt=30)  # rows of 250 -> 249 targets
    assert len(sb) == math.ceil(249 / 30) == 9
    shapes = [x.shape for x, _ in sb]
    assert shapes == [(4, 30)] * 8 + [(4, 9)]
    xs, ys = zip(*sb, strict=True)
    x_all, y_all = torch.cat(xs, dim=1), torch.cat(ys, dim=1)
    rows = batchify(data, 4)
    assert torch.equal(x_all, rows[:, :-1]) and torch.equal(y_all, rows[:, 1:])
    assert torch.equal(y_all, x_all + 1)  # y is x shifted by one
    assert sb.num_tokens == 4 * 249 == sum(y.numel() for _, y in sb)
    x, y = sb[0]
    assert x.is_contiguous() and y.is_contiguous()


def test_resume_by_index_gives_same_windows() -> None:
    sb = StreamBatches(
        torch.randint(0, 50, (5000,), generator=torch.Generator().manual_seed(0)), batch_size=8, bptt=17, pad=True
    )
    windows = list(sb)
    for i in (0, 3, len(sb) - 1):
        assert all(torch.equal(a, b) for a, b in zip(sb[i], windows[i], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(sb[-1], windows[-1], strict=True))
    resumed = [sb[i] for i in range(5, len(sb))]
    assert all(torch.equal(r[0], w[0]) and torch.equal(r[1], w[1]) for r, w in zip(resumed, windows[5:], strict=True))
    with pytest.raises(IndexError):
        sb[len(sb)]
    x, _ = sb[0]
    x[:] = -1  # windows are copies: mutating one does not change the stream
    assert int(sb[0][0].min()) >= 0


def _check_padded(n: int, batch_size: int, bptt: int) -> None:
    data = torch.arange(n)
    sb = StreamBatches(data, batch_size=batch_size, bptt=bptt, pad=True)
    targets = []
    for x, y in sb:
        assert x.shape == y.shape and x.shape[0] == batch_size and 1 <= x.shape[1] <= bptt
        assert int(x.min()) >= 0  # inputs are valid ids even where padded
        real = y != -100
        assert torch.equal(y[real], x[real] + 1)  # every real target follows its input
        targets.append(y[real])
    got = torch.sort(torch.cat(targets)).values
    # every symbol except the very first of the stream is a target exactly once
    assert torch.equal(got, torch.arange(1, n))
    assert sb.num_tokens == n - 1


@pytest.mark.parametrize(
    ("n", "batch_size", "bptt"),
    [
        (1000, 4, 30),
        (1001, 4, 30),
        (997, 7, 10),
        (5, 4, 3),
        (2, 1, 1),
        (3, 10, 5),
        (100, 1, 100),
    ],
)
def test_padded_covers_every_target_once(n: int, batch_size: int, bptt: int) -> None:
    _check_padded(n, batch_size, bptt)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 400), st.integers(1, 12), st.integers(1, 50))
def test_padded_covers_every_target_once_property(n: int, batch_size: int, bptt: int) -> None:
    _check_padded(n, batch_size, bptt)


def test_batchify_padded_layout() -> None:
    rows = batchify_padded(torch.arange(10), 4)  # 9 targets -> L = 3, rows overlap by one
    assert rows.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, -100, -100, -100]]
    assert batchify_padded(torch.arange(10), 3, pad_value=-1).tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    with pytest.raises(ValueError):
        batchify_padded(torch.arange(10), 3, pad_value=0)  # could be a real id
    with pytest.raises(ValueError):
        batchify_padded(torch.arange(1), 3)


def test_padded_eval_loss_is_independent_of_batch_size() -> None:
    """A context-free model's summed loss must not depend on B: same targets, each once."""
    data = torch.randint(0, 20, (3001,), generator=torch.Generator().manual_seed(1))
    logits_per_symbol = torch.randn(20, generator=torch.Generator().manual_seed(2))
    totals = []
    for batch_size in (1, 3, 16):
        sb = StreamBatches(data, batch_size=batch_size, bptt=64, pad=True)
        total = 0.0
        for x, y in sb:
            logits = logits_per_symbol.expand(*x.shape, 20).reshape(-1, 20)
            total += float(F.cross_entropy(logits, y.reshape(-1), ignore_index=-100, reduction="sum"))
        totals.append(total / sb.num_tokens)
    # float32 summation order differs with B; one missed or doubled target would be ~1e-4
    assert totals[0] == pytest.approx(totals[1], rel=1e-6) and totals[0] == pytest.approx(totals[2], rel=1e-6)
    expected = float(F.cross_entropy(logits_per_symbol.expand(3000, 20), data[1:]))
    assert totals[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_small_dtype_streams_give_the_same_int64_windows(pad: bool, dtype: torch.dtype) -> None:
    """Corpora hold uint8/int16/int32 streams; windows are int64, equal to those of an int64 stream,
    and the padded layout equals batchify_padded's."""
    data = torch.randint(0, 200, (1003,), generator=torch.Generator().manual_seed(0))
    stream = data.to(dtype)
    small = StreamBatches(stream, batch_size=5, bptt=17, pad=pad)
    wide = StreamBatches(data, batch_size=5, bptt=17, pad=pad)
    assert len(small) == len(wide) and small.num_tokens == wide.num_tokens
    for (xs, ys), (xw, yw) in zip(small, wide, strict=True):
        assert xs.dtype == ys.dtype == torch.long and torch.equal(xs, xw) and torch.equal(ys, yw)
        assert xs.is_contiguous() and ys.is_contiguous()
    if pad:
        rows = batchify_padded(data, 5)
        columns = torch.cat([y for _, y in small], dim=1)
        assert torch.equal(columns, rows[:, 1:])
        assert torch.equal(torch.cat([x for x, _ in small], dim=1), rows[:, :-1].clamp(min=0))
    else:
        assert small.rows.data_ptr() == stream.data_ptr()  # training rows are a view of the stream: no copy


def test_stream_batches_validation() -> None:
    with pytest.raises(ValueError):
        StreamBatches(torch.arange(100), batch_size=4, bptt=0)
    with pytest.raises(ValueError):
        StreamBatches(torch.arange(100), batch_size=0, bptt=5)
