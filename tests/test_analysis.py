"""The timescale measures recover known answers on synthetic processes and read real model memories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nlstm import CharLM, ModelConfig
from nlstm.analysis import autocorrelation_timescale, mean_step_change, memory_timescales, memory_traces


def ar1(phi: float, steps: int = 20_000, units: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.zeros((steps, units))
    noise = rng.standard_normal((steps, units))
    for t in range(1, steps):
        x[t] = phi * x[t - 1] + noise[t]
    return x


@pytest.mark.parametrize("phi", [0.5, 0.9, 0.97])
def test_ar1_timescale_matches_theory(phi):
    expected = math.ceil(-1.0 / math.log(phi))  # first integer lag with phi**lag < 1/e
    assert autocorrelation_timescale(ar1(phi), max_lag=200) == pytest.approx(expected, abs=1.0)


def test_slower_process_has_longer_timescale_and_smaller_steps():
    fast, slow = ar1(0.5), ar1(0.98) * math.sqrt(1 - 0.98**2)  # same stationary variance
    assert autocorrelation_timescale(slow) > 5 * autocorrelation_timescale(fast)
    assert mean_step_change(slow) < mean_step_change(fast) / 2


def test_constant_units_are_ignored_and_censoring():
    trace = np.zeros((100, 3))
    assert math.isnan(autocorrelation_timescale(trace))
    ramp = np.linspace(0, 1, 100)[:, None]  # never decorrelates within the window: censored at max_lag
    assert autocorrelation_timescale(ramp, max_lag=10) == 10


@pytest.mark.parametrize("arch,depth", [("nlstm", 3), ("stacked", 2)])
def test_memory_traces_of_a_model(arch, depth):
    torch.manual_seed(0)
    model = CharLM(ModelConfig(vocab_size=7, arch=arch, depth=depth, width=6, embedding_dim=4))
    traces = memory_traces(model, torch.randint(0, 7, (50,)))
    assert len(traces) == depth and traces[0].shape == (50, 6)
    stats = memory_timescales(traces)
    assert set(stats) == {f"{m}_l{k}" for m in ("timescale", "step_change") for k in range(depth)}
    assert model.training  # restored
