"""The driver compiles the fused kernel's C++ loops before a local CPU study's record starts, and only then."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from nlstm.fused import cpp
from study import run
from study.spec.load import load_spec

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "ablation-depth.yaml"


def setup_of(spec, gpus: float = 0.0) -> run.Setup:
    return run.Setup(spec=spec, phases=["search"], cpus=1, gpus=gpus, corpus=None, data_dir=None,
                     tracking_uri="sqlite:///unused.db", study_dir=Path("unused"))


@pytest.mark.parametrize("address,gpus,impl,ablated,expected", [
    (None, 0.0, "fused", False, True),
    (None, 0.0, "reference", False, False),
    (None, 0.0, "reference", True, True),  # fused is one of the ablated values
    (None, 0.5, "fused", False, False),  # GPU trials
    ("10.0.0.1:6379", 0.0, "fused", False, False),  # a cluster's nodes build their own
])
def test_which_studies_build_the_loops_in_the_driver(monkeypatch, address, gpus, impl, ablated, expected):
    spec = load_spec(SPACE)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"impl": impl})})
    if ablated:
        spec = spec.model_copy(update={"ablation": spec.ablation.model_copy(
            update={"factors": {**spec.ablation.factors, "impl": ["fused", "reference"]}})})
    calls = []
    monkeypatch.setattr(cpp, "prepare", lambda: calls.append(1) or True)
    run.build_cpu_loops(argparse.Namespace(address=address), setup_of(spec, gpus))
    assert calls == ([1] if expected else [])
