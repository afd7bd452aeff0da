"""study.layout: the MLflow layout's names, shared by study/ and dashboards/. Fast, no Ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from study import layout
from study.layout import CONFIG_HASH_TAG, FAMILY_TAG, PHASE_TAG, SEED_TAG, trial_key_of, trial_run_name

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_layout_loads_neither_ray_mlflow_nor_torch():
    code = ("import sys, study.layout\n"
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


def test_run_names_say_the_phase_family_and_seed_as_documented():
    # the two examples of docs/mlflow-layout.md
    assert trial_run_name("search-0003", {FAMILY_TAG: "nlstm-d2"}) == "search-0003-nlstm-d2"
    tags = {FAMILY_TAG: "nlstm-d2", PHASE_TAG: "evaluate", SEED_TAG: "1", CONFIG_HASH_TAG: "3fa2c1d0e9"}
    assert trial_run_name("evaluate-3fa2c1d0e9-s1", tags) == "evaluate-nlstm-d2-s1-3fa2c1"
    assert trial_run_name("search-0003", {}) == "search-0003"  # a placeholder without its family keeps the key


def test_a_trial_key_comes_from_its_tune_config():
    assert trial_key_of({"trial_number": 3}) == "search-0003"
    assert trial_key_of({"trial_key": "ablation-ab12-s2", "trial_number": 3}) == "ablation-ab12-s2"
    assert trial_key_of({"lr": 0.1}) is None
