"""The driver's end-of-phase table names each ablation configuration's factors, read back from MLflow."""

from __future__ import annotations

from types import SimpleNamespace

from mlflow import MlflowClient

from study.driver.phases import phase_summary
from study.record.layout import CONFIG_HASH_TAG, FAMILY_TAG, KIND_TAG, PHASE_TAG, STATUS_TAG, TRIAL_ID_TAG, factor_tag


def test_ablation_rows_name_their_factors_but_not_the_family_again(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    experiment = client.create_experiment("s")
    for config, length, bpcs in (("aaa", 10, (0.60, 0.62)), ("bbb", 40, (1.90, 1.94))):
        client.create_run(experiment, tags={KIND_TAG: "config", PHASE_TAG: "ablation", CONFIG_HASH_TAG: config,
                                            factor_tag("dependency_length"): str(length),
                                            factor_tag("arch"): "nlstm", factor_tag("depth"): "2"})
        for seed, bpc in enumerate(bpcs, 1):
            run = client.create_run(experiment, tags={
                KIND_TAG: "trial", PHASE_TAG: "ablation", CONFIG_HASH_TAG: config, FAMILY_TAG: "nlstm-d2",
                TRIAL_ID_TAG: f"{config}-s{seed}", STATUS_TAG: "completed"})
            client.log_metric(run.info.run_id, "best_valid_bpc", bpc)
    tracker = SimpleNamespace(client=client, experiment_id=experiment)
    text = phase_summary(SimpleNamespace(tracker=tracker), "ablation")
    lines = text.splitlines()
    assert lines[1].endswith("status  factors")
    assert lines[2].startswith("  aaa (2)") and lines[2].endswith("completed  dependency_length=10")
    assert lines[3].startswith("  bbb (2)") and lines[3].endswith("completed  dependency_length=40")
    assert "arch=" not in text and "depth=" not in text
