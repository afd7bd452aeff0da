"""From the study file's values to trial configurations.

- ``resolve``: sampled/ablated values + the file's defaults -> one ``TrialConfig`` (model and
  training options, the budget), with the width solved from the budget by ``width_for_budget``,
  so every architecture of a comparison has the same parameter count.
- ``effective_candidate``: what a model computes decides its configuration (an LSTM's candidate is tanh).
- ``ablation_cells``: the ablation grid, one configuration per distinct cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from nlstm.params import BudgetSolution, width_for_budget
from study.spec.schema import (
    DATA_PARAMS,
    MODEL_PARAMS,
    FixedEntry,
    StudySpec,
    TrainDefaults,
)

TRIAL_NUMBER = "trial_number"  # added by DefineByRun to a search trial's values: its Optuna trial number


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs except its seed (and the data)."""

    params: dict[str, Any]  # the sampled/ablated values under their YAML names (what was chosen)
    model: dict[str, Any]  # ModelConfig fields except vocab_size and width
    train: dict[str, Any]  # TrainConfig fields except seed and device
    budget: float
    solution: BudgetSolution | None = field(default=None, compare=False)
    data: dict[str, Any] = field(default_factory=dict)  # corpus options this trial overrides (DATA_PARAMS)

    @property
    def arch(self) -> str:
        return self.model["arch"]

    @property
    def depth(self) -> int:
        return self.model["depth"]

    @property
    def family(self) -> str:
        """``nlstm-d2``, ``nlstm-d2-tanh`` (nested, with a tanh outer candidate), ``stacked-d2``, ``single-d1``."""
        tanh = self.arch == "nlstm" and self.depth > 1 and self.model.get("candidate_activation") == "tanh"
        return f"{self.arch}-d{self.depth}" + ("-tanh" if tanh else "")

    @property
    def candidate_activation(self) -> str:
        return self.model.get("candidate_activation", "tanh")

    @property
    def config_hash(self) -> str:
        """Identity of the configuration, without the seed (12 hex characters)."""
        data = {"model": self.model, "train": self.train, "budget": float(self.budget)}
        if self.data:  # only then: the hashes of studies without data factors stay what they were
            data["data"] = self.data
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def solve(self, vocab_size: int) -> TrialConfig:
        """The same configuration with its width (and embedding size) solved from the budget."""
        s = width_for_budget(self.arch, self.depth, self.budget, vocab_size, embedding_dim=self.model["embedding_dim"])
        return TrialConfig(self.params, self.model, self.train, self.budget, s, self.data)

    def model_config(self, vocab_size: int) -> dict[str, Any]:
        assert self.solution is not None, "call solve() first"
        return self.model | {"vocab_size": vocab_size, "width": self.solution.width,
                             "embedding_dim": self.solution.embedding_dim}

    def mlflow_params(self, seed: int) -> dict[str, Any]:
        """What a trial run logs as params (docs/mlflow-layout.md)."""
        assert self.solution is not None, "call solve() first"
        s = self.solution
        return (self.params | self.model | self.train
                | {"budget": int(self.budget), "width": s.width, "embedding_dim": s.embedding_dim,
                   "num_params": s.params, "seed": seed})


def resolve(spec: StudySpec, phase: str, params: dict[str, Any]) -> TrialConfig:
    """Combine the file's defaults, the phase's training overrides and ``params`` (which win)."""
    params = {k: v for k, v in params.items() if k != TRIAL_NUMBER}
    model = spec.model.model_dump()
    train: dict[str, Any] = spec.phase_train(phase).model_dump()
    data: dict[str, Any] = {}
    for name, value in params.items():
        if name in MODEL_PARAMS:
            model[name] = value
        elif name in TrainDefaults.model_fields:
            train[name] = value
        elif name in DATA_PARAMS:
            data[name] = value
    # `layers` is the depth of a stacked LSTM; a single-layer LSTM has depth 1 whatever was sampled.
    if model["arch"] == "stacked" and "layers" in params:
        model["depth"] = params["layers"]
    model.pop("layers", None)
    if model["arch"] == "single":
        model["depth"] = 1
    model["candidate_activation"] = effective_candidate(model)
    budget = params.get("budget", fixed_budget(spec))
    return TrialConfig(params, model, train, float(budget), data=data)


def effective_candidate(model: dict[str, Any]) -> str:
    """The outer candidate a model computes: ``candidate_activation`` only chooses it for a nested model with
    a level inside (nlstm.cell); every LSTM (stacked, single, a depth-1 nested model) has tanh. Recording what
    is computed makes configurations that compute the same thing one configuration (one hash, one family)."""
    if model["arch"] == "nlstm" and model["depth"] > 1:
        return model.get("candidate_activation", "identity")
    return "tanh"


def fixed_budget(spec: StudySpec) -> float | None:
    return spec.budget.value if isinstance(spec.budget, FixedEntry) else None


def condition_holds(when: dict[str, Any] | None, values: dict[str, Any]) -> bool:
    for name, wanted in (when or {}).items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if name not in values or values[name] not in allowed:
            return False
    return True


@dataclass(frozen=True)
class AblationCell:
    factors: dict[str, Any]  # this cell's value of each factor
    config: TrialConfig


def ablation_cells(spec: StudySpec, base_params: dict[str, Any]) -> list[AblationCell]:
    """Every combination of the factors, on top of the base and ablation.params; cells that
    resolve to the same configuration (e.g. a single LSTM at several depths) are run once."""
    ab = spec.ablation
    assert ab is not None
    names = list(ab.factors)
    cells: dict[str, AblationCell] = {}
    base = {k: v for k, v in base_params.items() if k != TRIAL_NUMBER}
    if "depth" in ab.params or "depth" in ab.factors:
        base.pop("layers", None)  # an ablated depth must not be overridden by a searched `layers`
    for combo in itertools.product(*(ab.factors[n] for n in names)):
        factors = dict(zip(names, combo, strict=True))
        config = resolve(spec, "ablation", base | ab.params | factors)
        # what the cell computes: a single LSTM's depth is 1, an LSTM's candidate tanh, whatever the grid said
        computed = {"depth": config.depth, "candidate_activation": config.candidate_activation}
        factors = {k: computed.get(k, v) if k in computed else v for k, v in factors.items()}
        cells.setdefault(config.config_hash, AblationCell(factors, config))
    return list(cells.values())
