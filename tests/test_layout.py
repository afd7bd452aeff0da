"""study.record.layout: the MLflow layout's names, shared by study/ and dashboards/. Fast, no Ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from study.record import layout
from study.record.layout import CHANCE_MARGIN_BITS, below_chance, planned_key, search_key, trial_key_of

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_layout_loads_neither_ray_mlflow_nor_torch():
    code = ("import sys, study.record.layout\n"
            "print(sorted(m for m in ('ray', 'mlflow', 'torch', 'pandas', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_tag_and_metric_name_is_the_documented_one():
    doc = (REPO / "docs" / "mlflow-layout.md").read_text()
    tags = [v for k, v in vars(layout).items() if k.endswith("_TAG") and isinstance(v, str)]
    assert len(tags) > 20
    for name in [*tags, *layout.EPOCH_METRICS, *layout.FINAL_METRICS, *layout.PHASES, *layout.ARCHS]:
        assert f"`{name}" in doc or re.search(rf"\b{re.escape(name)}\b", doc), name
    assert layout.phase_tag("search") == "nlstm.phase.search" and "`nlstm.phase.<phase> = done`" in doc
    assert layout.factor_tag("dropout") == "nlstm.factor.dropout" and "`nlstm.factor.<name> = <value>`" in doc


def test_run_names_put_the_family_and_seed_first_as_documented():
    # the examples of docs/mlflow-layout.md
    assert search_key("nlstm-d2", 3) == "nlstm-d2-search-003"
    assert planned_key("evaluate", "nlstm-d2", 1, "3fa2c1d0e9ab") == "nlstm-d2-s1-evaluate-3fa2c1d0"
    doc = (REPO / "docs" / "mlflow-layout.md").read_text()
    assert "`nlstm-d2-search-003`" in doc and "`nlstm-d2-s1-evaluate-3fa2c1d0`" in doc


def test_a_trial_key_comes_from_its_tune_config():
    assert trial_key_of({"trial_key": "nlstm-d2-s2-ablation-ab12cd34", "phase": "ablation"}) == \
        "nlstm-d2-s2-ablation-ab12cd34"
    assert trial_key_of({"lr": 0.1}) is None


def test_one_chance_rule_is_the_trainers_margin_below_the_unigram_entropy():
    from nlstm.trainer import TrainConfig

    assert CHANCE_MARGIN_BITS == TrainConfig().learn_margin_bits == 0.1
    assert below_chance(4.36, 4.467) and not below_chance(4.37, 4.467)  # 0.107 and 0.097 bits below
    assert not below_chance(4.466, 4.467)  # "0.0005 bit below chance" is not learned
    assert not below_chance(float("nan"), 4.467) and not below_chance(None, 4.467) and not below_chance(1.0, None)
