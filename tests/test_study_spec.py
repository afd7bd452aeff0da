"""Study files: every malformed file gives one line naming the file, the key path and what was
expected (exit code 2, nothing written); the compiled space samples conditional parameters and
solves widths from the budget; the shipped study files validate. No Ray here: all fast."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from nlstm import CharLM, ModelConfig
from nlstm.trainer import TrainConfig
from study.search.space import grid_space, make_sampler, preview_search
from study.spec.configs import ablation_cells, resolve
from study.spec.errors import SpecError
from study.spec.load import load_spec, validate_spec
from study.spec.schema import ModelDefaults, TrainDefaults
from study.spec.smoke import shrink_for_smoke

REPO = Path(__file__).resolve().parents[1]
BASE = """\
name: t
data: {corpus: synthetic, options: {train_chars: 3000, valid_chars: 500, test_chars: 500}}
budget: 5000
"""
ABLATION = "ablation: {factors: {arch: [nlstm]}, seeds: [1]}\n"
SEARCH = "search: {space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}}\n"

FAMILIES = "search: {families: [{arch: nlstm, depth: 2}, {arch: stacked, layers: 2}], trials_per_family: 3, " \
    "space: {lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}}}\n"

# (file text, expected "key.path: message start")
MALFORMED = [
    (BASE + FAMILIES.replace(", trials_per_family: 3", ""), "search.families: expected search.trials_per_family"),
    (BASE + FAMILIES.replace("trials_per_family: 3", "trials_per_family: 3, num_samples: 6"),
     "search.num_samples: expected either num_samples or families"),
    (BASE + FAMILIES.replace("{arch: stacked, layers: 2}", "{arch: nlstm, depth: 2}"),
     "search.families[1]: expected distinct families; nlstm-d2 is also search.families[0]"),
    (BASE + FAMILIES.replace("{arch: stacked, layers: 2}", "{arch: stacked, depth: 2}"),
     "search.families[1].depth: expected layers for a stacked LSTM"),
    (BASE + FAMILIES.replace("{arch: stacked, layers: 2}", "{depth: 3}"), "search.families[1]: expected an arch"),
    (BASE + FAMILIES.replace("{arch: stacked, layers: 2}", "{arch: stacked, layers: 2, lr: 0.1}"),
     "search.families[1].lr: expected one of the model fields"),
    (BASE + FAMILIES.replace("{arch: stacked, layers: 2}", "{arch: nlstm, candidate_activation: relu}"),
     "search.families[1].candidate_activation: expected 'identity' or 'tanh'"),
    (BASE + FAMILIES.replace("space: {", "space: {dropout: [0.0, 0.1], depth: [2, 3], "),
     "search.space.depth: expected the families to fix it"),
    (BASE + "search: {trials_per_family: 3}\n", "search.trials_per_family: expected search.families"),
    ("", ": expected a mapping of sections at the top level, got null"),
    ("- a\n- b\n", ": expected a mapping of sections at the top level"),
    ("name: [t\n", ": line 2, column 1: expected valid YAML"),
    (BASE + "search:\n  space:\n    lr: 0.1\n    lr: 0.2\n", "search.space.lr: duplicate key (line 7)"),
    (BASE.replace("name: t\n", "") + ABLATION, "name: expected a value (required key is missing)"),
    (BASE.replace("name: t", "name: my study") + ABLATION, "name: expected letters, digits"),
    (BASE + ABLATION + "serach: {}\n", "serach: unknown key; expected one of name, description, data"),
    (BASE + ABLATION + "serach: {}\n", "(did you mean search?)"),
    (BASE + "search: {sampler: {type: tpe, sed: 1}}\n", "search.sampler.sed: unknown key; expected one of type, seed"),
    (BASE + ABLATION + "train: {epochs: 0}\n", "train.epochs: expected greater than or equal to 1, got 0"),
    (BASE + ABLATION + "train: {lr: fast}\n", "train.lr: expected a number, got 'fast'"),
    (BASE + ABLATION + "train: {batch_size: 3.5}\n", "train.batch_size: expected an integer, got 3.5"),
    (BASE + ABLATION + "train: {optimizer: adagrad}\n",
     "train.optimizer: expected 'adam', 'adamw' or 'sgd', got 'adagrad'"),
    (BASE + ABLATION + "train: 5\n", "train: expected a mapping of keys, got 5"),
    (BASE + ABLATION + "model: {arch: nested}\n", "model.arch: expected 'nlstm', 'stacked' or 'single', got 'nested'"),
    (BASE + ABLATION + "model: {arch: single, depth: 2}\n", "model.depth: expected 1 for arch single, got 2"),
    (BASE + ABLATION + "model: {dropout: 1.0}\n", "model.dropout: expected less than 1, got 1.0"),
    (BASE + ABLATION + "model: {embedding_dim: 0}\n", "model.embedding_dim: expected greater than or equal to 1"),
    (BASE.replace("budget: 5000\n", "") + ABLATION, "budget: expected a value (required key is missing)"),
    (BASE.replace("5000", "10") + ABLATION, "budget: expected a parameter count >= 100, got 10"),
    (BASE.replace("5000", "lots") + ABLATION, "budget: expected a parameter count >= 100, got 'lots'"),
    (BASE.replace("5000", "{type: float, low: 1.0e+5, high: 1.0e+4}") + ABLATION, "budget: expected finite low < high"),
    (BASE.replace("5000", "{type: categorical, choices: [1000, 2000], when: {arch: nlstm}}") + SEARCH,
     "budget.when: expected no condition on the budget"),
    (BASE + "search: {space: {lr: {type: floot, low: 0.1, high: 1}}}\n",
     "search.space.lr: expected type one of float, int, categorical, fixed, got 'floot'"),
    (BASE + "search: {space: {lr: {low: 0.1, high: 1}}}\n", "search.space.lr: expected a mapping with type:"),
    (BASE + "search: {space: {lr: {type: float, low: 0, high: 1, log: true}}}\n",
     "search.space.lr: expected low > 0 with log: true"),
    (BASE + "search: {space: {lr: {type: float, low: -1, high: 1}}}\n",
     "search.space.lr.low: expected greater than 0, got -1.0"),
    (BASE + "search: {space: {lr: {type: float, low: 1.0e-4, high: 1.0e-2, logg: true}}}\n",
     "search.space.lr.logg: unknown key; expected one of when, type, low, high, log, step (did you mean log?)"),
    (BASE + "search: {space: {depth: {type: int, low: 3, high: 2}}}\n",
     "search.space.depth: expected low <= high, got low=3, high=2"),
    (BASE + "search: {space: {lr: {type: categorical, choices: []}}}\n",
     "search.space.lr.choices: expected at least 1 item(s), got 0"),
    (BASE + "search: {space: {lr: [0.1, 0.1]}}\n", "search.space.lr.choices: expected distinct choices"),
    (BASE + "search: {space: {foo: {type: float, low: 0.1, high: 1}}}\n",
     "search.space.foo: unknown parameter; expected one of arch, depth, layers"),
    (BASE + "search: {space: {arch: {type: float, low: 0.1, high: 1}}}\n",
     "search.space.arch.type: expected categorical or fixed for arch, got float"),
    (BASE + "search: {space: {depth: {type: float, low: 1, high: 3}}}\n",
     "search.space.depth.type: expected int, categorical or fixed for depth (an integer), got float"),
    (BASE + "search: {space: {arch: [nlstm, nested]}}\n",
     "search.space.arch.choices[1]: expected 'nlstm', 'stacked' or 'single', got 'nested'"),
    (BASE + "search: {space: {dropout: 2}}\n", "search.space.dropout: expected less than 1, got 2"),
    (BASE + "search: {space: {depth: {type: int, low: 2, high: 3, when: {arch: nlstm}}}}\n",
     "search.space.depth.when.arch: expected a parameter defined earlier in search.space (none)"),
    (BASE + "search: {space: {arch: [nlstm, stacked], depth: {type: int, low: 2, high: 3, when: {arch: nested}}}}\n",
     "search.space.depth.when.arch: expected one of the values arch can take (nlstm, stacked), got 'nested'"),
    (BASE + "search: {space: {arch: [nlstm, stacked], layers: {type: int, low: 2, high: 3}}}\n",
     "search.space.layers.when: expected a condition such as {arch: stacked}"),
    (BASE + "search: {space: {arch: [nlstm, stacked], lr: {type: categorical, choices: [0.1, 0.2], balanced: true,"
     " when: {arch: nlstm}}}}\n", "search.space.lr.when: expected no condition on a balanced parameter"),
    (BASE + "search: {space: {budget: [1000, 2000]}}\n", "search.space.budget: expected the budget at the top level"),
    (BASE + "search: {sampler: {type: grid}, space: {lr: {type: float, low: 0.1, high: 1}}}\n",
     "search.space.lr: expected categorical, int or a float with a step for the grid sampler"),
    (BASE + "search: {sampler: {type: bayes}}\n",
     "search.sampler.type: expected 'tpe', 'random', 'cmaes', 'qmc' or 'grid', got 'bayes'"),
    (BASE + "search: {scheduler: {type: asha, reduction_factor: 1}}\n",
     "search.scheduler.reduction_factor: expected greater than 1, got 1"),
    (BASE + "search: {num_samples: ten}\n", "search.num_samples: expected an integer, got 'ten'"),
    # synthetic sizes are bounded (issue 20: 10^11 characters ran out of memory after 40 s)
    (BASE.replace("train_chars: 3000", "train_chars: 100000000000") + ABLATION,
     "data.options.train_chars: expected an integer in [1, 100,000,000] (the size of enwik8; a larger split takes "
     "minutes and gigabytes to generate), got 100,000,000,000"),
    (BASE.replace("valid_chars: 500", "valid_chars: 100000001") + ABLATION,
     "data.options.valid_chars: expected an integer in [1, 100,000,000]"),
    (BASE.replace("test_chars: 500", "test_chars: 0") + ABLATION,
     "data.options.test_chars: expected an integer in [1, 100,000,000], got 0"),
    (BASE.replace("train_chars: 3000", "train_chars: 3000, max_nesting: 101") + ABLATION,
     "data.options.max_nesting: expected an integer in [0, 100], got 101"),
    (BASE.replace("train_chars: 3000", "train_chars: 3000, dependency_length: 100000001") + ABLATION,
     "data.options.dependency_length: expected an integer in [2, 100,000,000], got 100,000,001"),
    (BASE.replace("train_chars: 3000", "train_chars: 3000, brackets: '" + "()" * 33 + "'") + ABLATION,
     "data.options: expected valid synthetic options (brackets must be distinct opener/closer pairs (at most 64"),
    (BASE + "search: {metric: test_bpc}\n", "search.metric: expected 'valid_bpc', got 'test_bpc'"),
    (BASE + "search: {train: {bptt: 0}}\n", "search.train.bptt: expected greater than or equal to 1, got 0"),
    (BASE + "evaluate: {seeds: [1]}\n", "evaluate: expected a search section"),
    (BASE + SEARCH + "evaluate: {seeds: [1, 0]}\n",
     "evaluate.seeds: expected seeds different from the tuning seed search.seed (0), got 0"),
    (BASE + SEARCH + "evaluate: {seeds: [1, 1]}\n", "evaluate.seeds: expected distinct seeds, got [1, 1]"),
    (BASE + SEARCH + "evaluate: {seeds: []}\n", "evaluate.seeds: expected at least 1 item(s), got 0"),
    (BASE + SEARCH + "evaluate: {}\n", "evaluate.seeds: expected a value (required key is missing)"),
    (BASE + SEARCH + "evaluate: {seeds: [1], per: model}\n",
     "evaluate.per: expected 'none', 'arch' or 'family', got 'model'"),
    (BASE + "ablation: {factors: {widht: [1]}, seeds: [1]}\n", "ablation.factors.widht: unknown parameter"),
    (BASE + "ablation: {factors: {depth: [1, 0]}, seeds: [1]}\n",
     "ablation.factors.depth[1]: expected greater than or equal to 1, got 0"),
    (BASE + "ablation: {factors: {budget: [1000, 50]}, seeds: [1]}\n",
     "ablation.factors.budget[1]: expected a parameter count >= 100, got 50"),
    (BASE + "ablation: {factors: {arch: []}, seeds: [1]}\n",
     "ablation.factors: expected a non-empty list of values for factor arch"),
    (BASE + "ablation: {factors: {}, seeds: [1]}\n", "ablation.factors: expected at least 1 item(s), got 0"),
    (BASE + "ablation: {params: {lr: -1}, factors: {arch: [nlstm]}, seeds: [1]}\n",
     "ablation.params.lr: expected greater than 0, got -1"),
    (BASE + "ablation: {base: search, factors: {arch: [nlstm]}, seeds: [1]}\n",
     "ablation.base: expected `defaults` when the study has no search section"),
    (BASE + SEARCH + "ablation: {base: search, factors: {arch: [nlstm]}, seeds: [0]}\n",
     "ablation.seeds: expected seeds different from the tuning seed search.seed (0), got 0"),
    (BASE, ": expected at least one phase"),
    (BASE.replace("synthetic", "ptbb") + ABLATION, "data.corpus: expected one of ptb, text8"),
    (BASE.replace("synthetic", "ptbb") + ABLATION, "(did you mean ptb?)"),
    (BASE.replace("train_chars: 3000", "train_chars: 3000, colour: red") + ABLATION,
     "data.options.colour: unknown option for synthetic; expected one of seed, train_chars"),
    (BASE.replace("synthetic, options: {train_chars: 3000, valid_chars: 500, test_chars: 500}",
                  "ptb, options: {split: 0.5}") + ABLATION, "data.options.split: unknown option for ptb; expected no"),
    (BASE.replace("train_chars: 3000", "train_chars: 0") + ABLATION,
     "data.options.train_chars: expected an integer in [1, 100,000,000], got 0"),
    (BASE + ABLATION + "resources: {gpus_per_trial: -1}\n",
     "resources.gpus_per_trial: expected greater than or equal to 0, got -1"),
    (BASE + ABLATION + "resources: {gpus_per_trial: 1.5}\n",
     "resources.gpus_per_trial: expected a fraction <= 1 or a whole number of GPUs, got 1.5"),
    (BASE + ABLATION + "smoke: {epochs: 0}\n", "smoke.epochs: expected greater than or equal to 1, got 0"),
    (BASE + ABLATION + "smoke: {train: {optimizer: rmsprop}}\n", "smoke.train.optimizer: expected 'adam'"),
]


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,expected", MALFORMED, ids=[f"{i:02d}" for i in range(len(MALFORMED))])
def test_malformed_study_files_name_file_path_and_expectation(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    if expected.startswith("("):  # a hint at the end of the line
        assert message.startswith(f"{path}: ") and expected in message, message
    else:  # "key.path: expected ..." or ": message" (about the whole file)
        assert message.startswith(f"{path}{expected}" if expected.startswith(":") else f"{path}: {expected}"), message


def test_cli_rejects_a_bad_file_with_exit_code_2_and_writes_nothing(tmp_path):
    bad = write(tmp_path, BASE + ABLATION + "train: {epochs: 0}\n")
    out = subprocess.run([sys.executable, str(REPO / "study" / "run.py"), "--space", str(bad)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    expected = f"error: {bad}: train.epochs: expected greater than or equal to 1, got 0"
    assert out.stderr.strip().splitlines() == [expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no mlflow.db, no studies/


@pytest.mark.parametrize("argv,message", [
    (["--phases", "search"], "--phases: search is not a phase of"),
    (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5: this machine has no GPU"),
    (["--cpus-per-trial", "100000"], "--cpus-per-trial 100000: this machine has"),
])
def test_cli_argument_errors_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    import torch

    from study.run import main

    if "--gpus-per-trial" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, BASE + ABLATION)
    assert main(["--space", str(spec), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from study.run import main

    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path, BASE + "search: {space: {arch: {type: categorical, choices: [nlstm, stacked, single], "
                 "balanced: true}, depth: {type: int, low: 2, high: 3, when: {arch: nlstm}}}, num_samples: 3,"
                 " train: {epochs: 1, batch_size: 8, bptt: 20}}\n")
    assert main(["--space", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for text in ("search: 3 trials", "nlstm-d2", "nlstm-d3", "stacked-d2", "single-d1", "estimated duration",
                 "nothing was trained or written"):
        assert text in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


# ------------------------------------------------------------------ the schema mirrors the library
def test_defaults_mirror_the_library_dataclasses():
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ModelDefaults.model_fields) == model_fields - {"vocab_size", "width"}
    assert set(TrainDefaults.model_fields) == {f.name for f in dataclasses.fields(TrainConfig)} - {"seed", "device"}
    for name, f in TrainDefaults.model_fields.items():  # same defaults as the trainer
        assert f.default == getattr(TrainConfig(), name), name


def test_yaml_reads_exponents_without_a_dot_as_floats(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "search: {space: {lr: {type: float, low: 1e-4, high: 1e-2, log: true}},"
                           " train: {lr: 3e-3}}\n"))
    assert spec.search.space["lr"].low == 1e-4 and spec.search.train.lr == 3e-3


def test_phase_training_merges_overrides_onto_the_top_level(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "train: {epochs: 7, bptt: 30}\n" + SEARCH.replace(
        "}}}\n", "}}, train: {epochs: 2}}\n") + "evaluate: {seeds: [1]}\n"))
    assert (spec.search.train.epochs, spec.search.train.bptt) == (2, 30)
    assert (spec.evaluate.train.epochs, spec.evaluate.train.bptt) == (7, 30)


# ------------------------------------------------------------------ the compiled space
CONDITIONAL = BASE + """\
model: {embedding_dim: 8}
search:
  space:
    arch: [nlstm, stacked, single]
    depth: {type: int, low: 2, high: 3, when: {arch: nlstm}}
    layers: {type: int, low: 2, high: 4, when: {arch: stacked}}
    lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
    dropout: 0.1
  sampler: {type: random, seed: 3}
"""


def test_conditional_parameters_are_sampled_only_when_their_condition_holds(tmp_path):
    spec = load_spec(write(tmp_path, CONDITIONAL))
    seen = set()
    for params in preview_search(spec, 40):
        arch = params["arch"]
        assert ("depth" in params) == (arch == "nlstm") and ("layers" in params) == (arch == "stacked"), params
        assert params["dropout"] == 0.1 and 1e-3 <= params["lr"] <= 1e-2
        cfg = resolve(spec, "search", params)
        expected = {"nlstm": params.get("depth"), "stacked": params.get("layers"), "single": 1}[arch]
        assert cfg.depth == expected and cfg.model["dropout"] == 0.1 and cfg.train["lr"] == params["lr"]
        seen.add(cfg.family)
    assert {"nlstm-d2", "nlstm-d3", "stacked-d2", "stacked-d4", "single-d1"} <= seen


def test_widths_are_solved_from_the_budget_for_every_architecture(tmp_path):
    spec = load_spec(write(tmp_path, CONDITIONAL.replace("budget: 5000", "budget: 20000")))
    vocab = 34
    counts = {}
    for arch, depth in [("nlstm", 2), ("nlstm", 3), ("stacked", 3), ("single", 1)]:
        cfg = resolve(spec, "search", {"arch": arch, "depth": depth, "layers": depth}).solve(vocab)
        model = CharLM(ModelConfig(**cfg.model_config(vocab)))
        assert model.num_params() == cfg.solution.params == cfg.mlflow_params(seed=0)["num_params"]
        assert abs(cfg.solution.params - 20000) / 20000 < 0.01
        counts[cfg.family] = (cfg.solution.width, cfg.solution.params)
    assert counts["nlstm-d2"] != counts["single-d1"]  # the single LSTM is wider to match
    assert counts["single-d1"][0] > counts["nlstm-d2"][0]


def test_searched_budget_is_a_dimension_of_the_space(tmp_path):
    spec = load_spec(write(tmp_path, CONDITIONAL.replace("budget: 5000", "budget: [5000, 20000]")))
    budgets = {resolve(spec, "search", p).budget for p in preview_search(spec, 20)}
    assert budgets == {5000.0, 20000.0}


def test_config_hash_ignores_the_seed_but_not_the_configuration(tmp_path):
    spec = load_spec(write(tmp_path, CONDITIONAL))
    a = resolve(spec, "search", {"arch": "nlstm", "depth": 2, "lr": 0.002})
    assert a.config_hash == resolve(spec, "search", {"arch": "nlstm", "depth": 2, "lr": 0.002}).config_hash
    assert a.config_hash != resolve(spec, "search", {"arch": "nlstm", "depth": 3, "lr": 0.002}).config_hash
    assert a.config_hash != resolve(spec, "evaluate" if spec.evaluate else "search",
                                    {"arch": "nlstm", "depth": 2, "lr": 0.003}).config_hash


def test_balanced_parameters_take_turns(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "search: {space: {arch: {type: categorical, choices: [nlstm, stacked,"
                           " single], balanced: true}, lr: [0.01, 0.02]}, sampler: {type: tpe, seed: 0}}\n"))
    archs = [p["arch"] for p in preview_search(spec, 6)]
    assert archs == ["nlstm", "stacked", "single"] * 2


def test_grid_sampler_covers_the_grid(tmp_path):
    spec = load_spec(write(tmp_path, BASE.replace("5000", "[3000, 5000]") + "search: {sampler: {type: grid},"
                           " space: {arch: [nlstm, single], depth: {type: int, low: 2, high: 3}}}\n"))
    assert grid_space(spec) == {"budget": [3000, 5000], "arch": ["nlstm", "single"], "depth": [2, 3]}
    combos = {(p["budget"], p["arch"], p["depth"]) for p in preview_search(spec, 8)}
    assert len(combos) == 8


@pytest.mark.parametrize("kind", ["tpe", "random", "cmaes", "qmc", "grid"])
def test_every_sampler_can_be_built(tmp_path, kind):
    spec = load_spec(write(tmp_path, BASE + f"search: {{sampler: {{type: {kind}, seed: 1}}, space: "
                           "{depth: {type: int, low: 1, high: 3}}}\n"))
    assert isinstance(make_sampler(spec), optuna.samplers.BaseSampler)
    assert len(preview_search(spec, 3)) == 3


@pytest.mark.parametrize("kind", ["tpe", "random", "cmaes", "qmc"])
def test_a_sampler_built_again_for_a_resumed_study_does_not_replay_its_proposals(tmp_path, kind):
    """A driver that stopped after one trial and came back builds the family's sampler again: it must propose
    a new configuration, not the one its seed gave first (the ptb-tuned search ran one duplicate that way)."""
    spec = load_spec(write(tmp_path, BASE + f"search: {{sampler: {{type: {kind}, seed: 0}}, space: "
                           "{lr: {type: float, low: 1.0e-3, high: 3.0e-2, log: true}}}\n"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, sampler=make_sampler(spec))
    first = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
    study.tell(first, 2.0)
    resumed = optuna.load_study(study_name="s", storage=storage)
    resumed.sampler = make_sampler(spec, trials_so_far=len(resumed.trials))
    again = resumed.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
    assert again.params["lr"] != first.params["lr"]
    fresh = optuna.create_study(sampler=make_sampler(spec, trials_so_far=0))  # a fresh study: the file's seed
    assert fresh.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)}).params == first.params


def test_ablation_grid_runs_each_distinct_configuration_once(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "ablation: {params: {lr: 0.005}, factors: {arch: [nlstm, stacked, "
                           "single], depth: [1, 2, 3], candidate_activation: [identity, tanh]}, seeds: [1, 2]}\n"))
    cells = ablation_cells(spec, {})
    # single ignores depth, and only a nested model with a level inside has an outer candidate to choose:
    # nlstm d1 + nlstm d2, d3 x 2 candidates + stacked d1, d2, d3 + single = 1 + 4 + 3 + 1 = 9 configurations
    assert len(cells) == 9
    assert all(c.config.train["lr"] == 0.005 for c in cells)
    singles = [c for c in cells if c.config.arch == "single"]
    assert {c.config.depth for c in singles} == {1} and len(singles) == 1
    assert sorted(c.config.family for c in cells) == ["nlstm-d1", "nlstm-d2", "nlstm-d2-tanh", "nlstm-d3",
                                                      "nlstm-d3-tanh", "single-d1", "stacked-d1", "stacked-d2",
                                                      "stacked-d3"]


def test_smoke_shrinks_the_same_study(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "train: {epochs: 30}\n" + SEARCH.replace("}}}\n", "}}, num_samples: 40}\n")
                           + "evaluate: {seeds: [1, 2, 3]}\nsmoke: {budget: 1000, train: {batch_size: 4}}\n"))
    small = shrink_for_smoke(spec)
    assert small.name == "t-smoke" and small.search.num_samples == 2 and small.evaluate.seeds == [1]
    assert small.search.train.epochs == 1 and small.evaluate.train.max_steps_per_epoch == 10
    assert small.evaluate.train.batch_size == 4 and small.budget.value == 1000
    assert small.data.max_train_tokens == 20_000 and small.study_hash() != spec.study_hash()
    assert list(small.search.space) == list(spec.search.space)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_files_validate(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    small = shrink_for_smoke(spec)
    assert small.phases == spec.phases
    if spec.search is not None:
        assert len(preview_search(spec, 3)) == 3


def test_specs_round_trip_through_their_json(tmp_path):
    spec = load_spec(write(tmp_path, CONDITIONAL + "evaluate: {seeds: [1], per: arch}\n"))
    again = validate_spec(spec.model_dump(mode="json"))
    assert again.study_hash() == spec.study_hash()


# ------------------------------------------------------------------ early stopping and the sampler
def test_dependency_length_is_a_data_factor_with_its_own_corpus_and_hash(tmp_path):
    spec = load_spec(write(tmp_path, BASE + "ablation: {factors: {dependency_length: [10, 40], arch: [nlstm]}, "
                           "seeds: [1]}\n"))
    cells = ablation_cells(spec, {})
    assert [c.config.data for c in cells] == [{"dependency_length": 10}, {"dependency_length": 40}]
    assert all("dependency_length" not in c.config.train and "dependency_length" not in c.config.model
               for c in cells)
    assert cells[0].config.config_hash != cells[1].config.config_hash  # two corpora: two configurations
    # a study without data factors keeps the hash it had before data factors existed
    plain = resolve(spec, "ablation", {"arch": "nlstm"})
    assert plain.data == {} and plain.config_hash == hashlib.sha256(json.dumps(
        {"model": plain.model, "train": plain.train, "budget": float(plain.budget)}, sort_keys=True,
        default=str).encode()).hexdigest()[:12]
    assert resolve(spec, "ablation", {"arch": "nlstm", "dependency_length": 40}).solve(40).mlflow_params(1)[
        "dependency_length"] == 40


@pytest.mark.parametrize(("factor", "problem"), [
    ("[1]", "ablation.factors.dependency_length[0]: expected an integer in [2, 100,000,000], got 1"),
    ("[40, 100000001]", "ablation.factors.dependency_length[1]: expected an integer in [2, 100,000,000], got "
                        "100,000,001"),
    ("['40']", "ablation.factors.dependency_length[0]: expected an integer, got '40'"),
    ("[true]", "ablation.factors.dependency_length[0]: expected an integer, got true"),
])
def test_a_bad_dependency_length_is_one_line(tmp_path, factor, problem):
    path = write(tmp_path, BASE + f"ablation: {{factors: {{dependency_length: {factor}}}, seeds: [1]}}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {problem}"), str(info.value)


def test_dependency_length_needs_the_synthetic_corpus(tmp_path):
    path = write(tmp_path, BASE.replace("{corpus: synthetic, options: {train_chars: 3000, valid_chars: 500, "
                                        "test_chars: 500}}", "{corpus: ptb}")
                 + "ablation: {factors: {dependency_length: [10, 40]}, seeds: [1]}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (f"{path}: ablation.factors.dependency_length: dependency_length is an option of the "
                               "synthetic corpus; this study uses ptb")


def test_search_families_each_get_the_budget_and_name_their_outer_candidate(tmp_path):
    from study.search.space import num_samples, tuning_families

    text = BASE + FAMILIES.replace("{arch: stacked, layers: 2}",
                                   "{arch: nlstm, depth: 2, candidate_activation: tanh}, {arch: stacked, layers: 2}, "
                                   "{arch: single}")
    spec = load_spec(write(tmp_path, text))
    families = tuning_families(spec)
    assert [f.name for f in families] == ["nlstm-d2", "nlstm-d2-tanh", "stacked-d2", "single-d1"]
    assert [f.optuna_study for f in families] == [f"t/{f.name}" for f in families]
    assert all(f.trials == 3 for f in families) and num_samples(spec) == 12
    # what a model computes decides its configuration: an LSTM's candidate is tanh whatever the file says
    identity, tanh = (resolve(spec, "search", {"arch": "stacked", "layers": 2, "candidate_activation": c})
                      for c in ("identity", "tanh"))
    assert identity.config_hash == tanh.config_hash and identity.family == tanh.family == "stacked-d2"
    assert resolve(spec, "search", {"arch": "nlstm", "depth": 1}).family == "nlstm-d1"
    assert resolve(spec, "search", {"arch": "nlstm", "depth": 1}).candidate_activation == "tanh"
    assert resolve(spec, "search", {"arch": "nlstm", "depth": 2}).candidate_activation == "identity"
