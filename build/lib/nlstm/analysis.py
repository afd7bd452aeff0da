"""Memory timescales: the paper's second claim, that inner memories change more slowly.

For a trained model we read its memories on held-out text (the Nested LSTM's per-level c^k, the
stacked LSTM's per-layer cells) and summarise how slowly each level moves with two numbers:
- the autocorrelation timescale: the first lag at which a unit's autocorrelation falls below 1/e,
  averaged over units (an AR(1) unit with coefficient phi gives about -1/ln(phi));
- the mean step change |c_t - c_{t-1}|, the smoothness the paper's activation plots show.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


@torch.no_grad()
def memory_traces(model: nn.Module, tokens: Tensor) -> list[np.ndarray]:
    """Each level's (nested) or layer's (stacked) memory while reading ``tokens`` (1-d): (steps, units)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    _, _, memories = model(tokens.to(device, torch.long).unsqueeze(0), return_memories=True)
    model.train(was_training)
    return [m[0].float().cpu().numpy() for m in memories]


def autocorrelation_timescale(trace: np.ndarray, max_lag: int | None = None, min_std: float = 1e-6) -> float:
    """Mean over units of the first lag where the autocorrelation drops below 1/e (censored at max_lag).

    Units that barely move (std < min_std) have no defined autocorrelation and are left out;
    NaN when no unit moves."""
    steps = trace.shape[0]
    max_lag = min(max_lag or steps // 4, steps - 1)
    x = trace - trace.mean(axis=0)
    keep = x.std(axis=0) > min_std
    if max_lag < 1 or not keep.any():
        return float("nan")
    x = x[:, keep]
    n_fft = 1 << (2 * steps - 1).bit_length()  # zero-padded FFT: linear, not circular, correlation
    spectrum = np.fft.rfft(x, n=n_fft, axis=0)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=n_fft, axis=0)[: max_lag + 1]
    acf = acov / acov[0]
    below = acf[1:] < 1.0 / np.e
    first = np.where(below.any(axis=0), below.argmax(axis=0) + 1, max_lag)
    return float(first.mean())


def mean_step_change(trace: np.ndarray) -> float:
    return float(np.abs(np.diff(trace, axis=0)).mean()) if trace.shape[0] > 1 else float("nan")


def memory_timescales(traces: list[np.ndarray], max_lag: int | None = None) -> dict[str, float]:
    """``timescale_l{k}`` and ``step_change_l{k}`` for each level/layer k (the names MLflow records)."""
    stats: dict[str, float] = {}
    for k, trace in enumerate(traces):
        stats[f"timescale_l{k}"] = autocorrelation_timescale(trace, max_lag)
        stats[f"step_change_l{k}"] = mean_step_change(trace)
    return stats
