"""Long, growing studies: a finished study extended by its file runs only the new work; an edit that would
change what its finished runs mean, or data that changed under it, is refused in one line (exit 2); every
trial run records the code that trained it."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_study_run import kind, optuna_trials, runs_of, study_file

from study.run import main
from study.spec.extension import compare_specs
from study.spec.load import load_spec

pytestmark = pytest.mark.slow
GROWING = """\
train: {epochs: 2, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.02, patience: null}
search:
  families: [{arch: nlstm, depth: 2}, {arch: single}]
  trials_per_family: 1
  space:
    lr: {type: float, low: 3.0e-3, high: 3.0e-2, log: true}
  sampler: {type: random, seed: 0}
  scheduler: {type: none}
evaluate: {top_k: 1, per: family, seeds: [1]}
"""


def _trial_ids(tmp_path: Path, study: str) -> dict[str, str]:
    return {r.data.tags["nlstm.trial_id"]: r.info.run_id for r in kind(runs_of(tmp_path, study)[1], "trial")}


def test_a_finished_study_extended_by_a_seed_and_search_trials_runs_exactly_those(tmp_path, monkeypatch, ray_local,
                                                                                   capsys):
    spec = study_file(tmp_path, "grow", GROWING)
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec)]) == 0
    before = _trial_ids(tmp_path, "grow")
    assert len(before) == 4  # 2 search trials, 2 evaluate configurations x 1 seed

    spec.write_text(spec.read_text().replace("trials_per_family: 1", "trials_per_family: 2")
                    .replace("seeds: [1]", "seeds: [1, 2]").replace("description", "description"))
    capsys.readouterr()
    assert main(["--space", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "extending study grow: search.trials_per_family 1 -> 2; evaluate.seeds + [2]" in out, out
    after = _trial_ids(tmp_path, "grow")
    assert all(after[key] == run_id for key, run_id in before.items())  # every finished run kept as it was
    new = sorted(set(after) - set(before))
    search_new = [k for k in new if "-search-" in k]
    assert search_new == ["nlstm-d2-search-001", "single-d1-search-001"], new  # the two new search trials
    evaluate_new = [k for k in new if "-evaluate-" in k]
    # seed 2 of each family's chosen configuration (and seeds 1-2 of a configuration the larger search chose)
    assert {k.split("-evaluate-")[0].rsplit("-", 1)[1] for k in evaluate_new} <= {"s1", "s2"}
    assert sum(1 for k in evaluate_new if "-s2-" in k) == 2
    for family in ("nlstm-d2", "single-d1"):
        assert [t.state.name for t in optuna_trials(tmp_path, f"grow/{family}")] == ["COMPLETE", "COMPLETE"]
    client, runs = runs_of(tmp_path, "grow")
    selected = [r for r in kind(runs, "config", "evaluate") if r.data.tags["nlstm.selected"] == "true"]
    assert len(selected) == 2 and all(r.data.metrics["n_seeds"] == 2 for r in selected)
    parent = kind(runs, "study")[0]
    assert parent.data.tags["nlstm.search_trials"] == "4"
    # the code that trained it, on every trial run
    assert all(r.data.tags["nlstm.code_version"].startswith("0.2.0") and r.data.tags["nlstm.record_version"] == "2"
               for r in kind(runs, "trial"))

    # An edit that changes what the finished runs mean: one line, exit 2, nothing written.
    count = len(runs)
    spec.write_text(spec.read_text().replace("lr: 0.02", "lr: 0.03"))
    capsys.readouterr()
    assert main(["--space", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lr: 0.02 -> 0.03 would change what its finished runs mean" in err[0], err
    assert "--restart" in err[0]
    spec.write_text(spec.read_text().replace("lr: 0.03", "lr: 0.02").replace("seeds: [1, 2]", "seeds: [2]"))
    assert main(["--space", str(spec)]) == 2
    assert "evaluate.seeds: 1 was removed" in capsys.readouterr().err
    assert len(runs_of(tmp_path, "grow")[1]) == count


def test_data_that_changed_under_a_study_is_refused(tmp_path, monkeypatch, ray_local, capsys):
    """A text:PATH corpus edited between two drivers: the data fingerprint is part of the study's identity."""
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    spec = tmp_path / "edited.yaml"
    spec.write_text(f"""name: edited
data: {{corpus: "text:{text}"}}
model: {{embedding_dim: 8}}
budget: 3000
train: {{epochs: 1, batch_size: 8, bptt: 20, eval_batch_size: 8, lr: 0.01, patience: null, learn_check: false}}
search: {{space: {{lr: {{type: float, low: 3.0e-3, high: 3.0e-2, log: true}}}}, scheduler: {{type: none}},
          num_samples: 1}}
evaluate: {{seeds: [1]}}
""")
    monkeypatch.chdir(tmp_path)
    assert main(["--space", str(spec), "--phases", "search"]) == 0
    text.write_text(text.read_text().replace("lazy", "sleepy"))
    capsys.readouterr()
    assert main(["--space", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its data changed since the study started" in err[0], err
    assert not kind(runs_of(tmp_path, "edited")[1], "trial", "evaluate")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s.replace("trials_per_family: 1", "trials_per_family: 3"), (["search.trials_per_family 1 -> 3"], None)),
    (lambda s: s.replace("{arch: single}", "{arch: single}, {arch: stacked, layers: 2}"),
     (['search.families + [{"arch": "stacked", "layers": 2}]'], None)),
    (lambda s: s + "ablation: {factors: {arch: [nlstm]}, seeds: [3]}\n", (["a new ablation phase"], None)),
    (lambda s: s.replace("seed: 0}", "seed: 1}"), ([], "search.sampler.seed: 0 -> 1")),
    (lambda s: s.replace("trials_per_family: 1", "trials_per_family: 1\n  max_concurrent: 1")
     .replace("epochs: 1", "epochs: 1"), ([], None)),
    (lambda s: s.replace("{arch: nlstm, depth: 2}, ", ""), ([], 'search.families: {"arch": "nlstm", "depth": 2} was '
                                                              "removed")),
    (lambda s: s.replace("budget: 3000", "budget: 4000"), ([], "budget.value: 3000 -> 4000")),
])
def test_which_edits_extend_a_study_and_which_invalidate_it(tmp_path, edit, expected):
    from test_study_run import DATA

    old = tmp_path / "old.yaml"
    old.write_text("name: g\n" + DATA + GROWING)
    new = tmp_path / "new.yaml"
    new.write_text(edit(old.read_text()))
    change = compare_specs(load_spec(old).model_dump(mode="json"), load_spec(new).model_dump(mode="json"))
    additions, invalid = expected
    assert change.additions == additions
    assert (change.invalid or "").startswith(invalid or "") and (change.invalid is None) == (invalid is None), \
        change.invalid


def test_evaluate_trials_run_begun_first_then_seed_by_seed_across_families():
    """A study paused midway holds the same seeds of every family: the queue is seed-major, not family-major,
    and trials an earlier driver began (interrupted, with checkpoints) go first."""
    from study.search.searcher import StudySearcher
    from study.trials.trainable import TrialSpec

    searcher = StudySearcher.__new__(StudySearcher)  # only the ordering, without a record behind it
    searcher._begun = {"nlstm-d2-s3-evaluate-a"}
    queue = [TrialSpec(f"{family}-s{seed}-evaluate-{h}", "evaluate", family, {}, seed, "parent")
             for family, h in (("nlstm-d2", "a"), ("single-d1", "b")) for seed in (1, 2, 3)]
    assert [t.key for t in searcher._in_seed_order(queue)] == [
        "nlstm-d2-s3-evaluate-a", "nlstm-d2-s1-evaluate-a", "single-d1-s1-evaluate-b", "nlstm-d2-s2-evaluate-a",
        "single-d1-s2-evaluate-b", "single-d1-s3-evaluate-b"]


def test_a_run_resumed_on_newer_code_records_every_version_that_trained_it(tmp_path):
    """Re-attaching an interrupted run under a new code version appends it (``a -> b``); the same version again,
    or a run that recorded none, changes nothing."""
    from mlflow import MlflowClient

    from study.record.layout import CODE_VERSION_TAG, KIND_TAG, STATUS_TAG
    from study.trials.mlflow_run import TrialRun, with_versions_so_far

    assert with_versions_so_far({CODE_VERSION_TAG: "b"}, {CODE_VERSION_TAG: "a"}) == {CODE_VERSION_TAG: "a -> b"}
    assert with_versions_so_far({CODE_VERSION_TAG: "b"}, {CODE_VERSION_TAG: "a -> b"}) == {CODE_VERSION_TAG: "a -> b"}
    assert with_versions_so_far({CODE_VERSION_TAG: "a"}, {CODE_VERSION_TAG: "a -> b"}) == {
        CODE_VERSION_TAG: "a -> b -> a"}  # went back to older code: said as it happened
    assert with_versions_so_far({CODE_VERSION_TAG: "b"}, {}) == {}

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("versions")

    def attach(version: str) -> TrialRun:
        run = TrialRun.attach(uri, experiment, "nlstm-d2-s1-evaluate-abc",
                              {KIND_TAG: "trial", CODE_VERSION_TAG: version}, {"lr": 0.01})
        run.set_status("interrupted")
        return run

    first = attach("0.2.0+g1a2b3c4")
    for version in ("0.2.0+g5d6e7f8", "0.2.0+g5d6e7f8", "0.2.0+g9a0b1c2"):
        again = attach(version)
    assert again.run_id == first.run_id
    tags = MlflowClient(uri).get_run(first.run_id).data.tags
    assert tags[CODE_VERSION_TAG] == "0.2.0+g1a2b3c4 -> 0.2.0+g5d6e7f8 -> 0.2.0+g9a0b1c2"
    assert tags[STATUS_TAG] == "interrupted"
