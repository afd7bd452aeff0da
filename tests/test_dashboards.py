"""Reports from a small real study store: numbers match the runs, the HTML opens with every figure.

The store is a real tiny study made once per module by the study runner itself
(``python study/run.py --space <tiny yaml>`` in a temporary folder: 3 search trials, then an
ablation grid nesting/stacking x depth 2/3 with 3 seeds each, synthetic corpus, width ~12). Two
more real tiny trainings are then logged into it in the layout of ``docs/mlflow-layout.md``: a 4th
seed still running (one epoch logged) and a failed trial, so the report is made "mid-study".
Without ``study/run.py`` (or with ``NLSTM_DASHBOARD_STORE=layout``) the whole store is built by
that layout-conformant logger instead: the same kind of study, trained with ``nlstm.Trainer``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from study.record.layout import CANDIDATE_TAG, CODE_VERSION_TAG, CPUS_TAG, STOP_REASON_TAG

ROOT = Path(__file__).resolve().parents[1]
STUDY = "tiny-study"
SEEDS = (1, 2, 3)
BUDGET = 3_000
EMBEDDING = 8
EPOCHS = 2
TAG = "nlstm."
CODE_VERSION = "0.0.0+gtest"
# the trainer's stop reasons, before and after they took the layout's names (study.record.layout.STOP_REASONS)
STOP_REASONS = {"epochs": "max_epochs", "early stopping": "plateau", "time budget": "time_budget"}
# MLflow's sqlite store trips SQLAlchemy's "noload is deprecated" warning on first use (not ours).
pytestmark = pytest.mark.filterwarnings("ignore:.*noload.*:DeprecationWarning")
CORPUS_OPTIONS = {"seed": 0, "train_chars": 8_000, "valid_chars": 1_000, "test_chars": 1_000}
# Enough steps that every run ends its first epoch well below the corpus's unigram entropy (4.47 bits; log2 of the
# vocabulary is 5.09): runs that did not learn are excluded from the report's statistics.
TRAIN = {"epochs": EPOCHS, "batch_size": 8, "bptt": 16, "lr": 5e-2, "patience": None, "max_steps_per_epoch": 60,
         "max_eval_tokens": 400}
STUDY_YAML = f"""
name: {STUDY}
data:
  corpus: synthetic
  options: {json.dumps(CORPUS_OPTIONS)}
model: {{embedding_dim: {EMBEDDING}}}
train: {json.dumps(TRAIN)}
budget: {BUDGET}
search:
  space:
    arch: {{type: categorical, choices: [nlstm, stacked, single], balanced: true}}
    lr: {{type: float, low: 3.0e-2, high: 6.0e-2, log: true}}
  sampler: {{type: random, seed: 0}}
  scheduler: {{type: none}}
  num_samples: 3
  seed: 0
  train: {{epochs: 1}}
ablation:
  base: defaults
  factors: {{arch: [nlstm, stacked], depth: [2, 3]}}
  seeds: {list(SEEDS)}
"""


# ---------------------------------------------------------------------------- the store
def _corpus():
    from nlstm.data import SyntheticConfig, synthetic_corpus

    return synthetic_corpus(SyntheticConfig(**CORPUS_OPTIONS))


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _train(corpus, arch: str, depth: int, seed: int, lr: float, epochs: int):
    """One real tiny training: (model, model config, train config, TrainResult)."""
    from nlstm import CharLM, ModelConfig, width_for_budget
    from nlstm.trainer import TrainConfig, Trainer, seed_everything

    sol = width_for_budget(arch, depth, BUDGET, len(corpus.vocab), EMBEDDING)
    model_cfg = ModelConfig(vocab_size=len(corpus.vocab), arch=arch, depth=depth, width=sol.width,
                            embedding_dim=sol.embedding_dim)
    seed_everything(seed)
    model = CharLM(model_cfg)
    cfg = TrainConfig(**(TRAIN | {"epochs": epochs, "lr": lr, "seed": seed}))
    return model, model_cfg, cfg, Trainer(model, corpus, cfg).fit()


def log_trial(client, exp_id: str, parent_id: str, corpus, *, phase: str, arch: str, depth: int, seed: int,
              lr: float = TRAIN["lr"], state: str = "completed", config_hash: str | None = None, staging: Path,
              epochs: int = EPOCHS) -> str:
    """Train (unless ``state == "failed"``) and log one trial run exactly per docs/mlflow-layout.md."""
    import torch
    from mlflow.entities import Metric, Param, RunTag

    from nlstm.analysis import memory_timescales, memory_traces

    family = f"{arch}-d{depth}"
    config = {"arch": arch, "depth": depth, "budget": BUDGET, "lr": lr}
    chash = config_hash or _config_hash(config)
    trial_id = f"{phase}-{chash}-s{seed}"
    tags = {"mlflow.parentRunId": parent_id, TAG + "kind": "trial", TAG + "phase": phase, TAG + "study": STUDY,
            TAG + "arch": arch, TAG + "depth": str(depth), TAG + "family": family, TAG + "config_hash": chash,
            TAG + "seed": str(seed), TAG + "trial_id": trial_id, TAG + "status": "running"}
    rid = client.create_run(exp_id, run_name=trial_id, tags=tags).info.run_id
    if state == "failed":
        client.log_batch(rid, params=[Param(k, str(v)) for k, v in (config | {"seed": seed}).items()],
                         tags=[RunTag(TAG + "status", "failed"),
                               RunTag(TAG + "fail_reason", "diverged: training loss became nan at epoch 1")])
        client.set_terminated(rid, "FAILED")
        return rid
    model, model_cfg, cfg, result = _train(corpus, arch, depth, seed, lr, epochs)
    now = int(time.time() * 1000)
    params = config | {"width": model_cfg.width, "embedding_dim": model_cfg.embedding_dim,
                       "num_params": model.num_params(), "epochs": cfg.epochs, "seed": seed, "bptt": cfg.bptt,
                       "batch_size": cfg.batch_size}
    history = result.history[:1] if state == "running" else result.history
    metrics = [Metric(key, float(getattr(r, key)), now + r.epoch, r.epoch) for r in history
               for key in ("train_bpc", "valid_bpc", "lr", "tokens_per_s", "train_time_s", "wall_time_s",
                           "tokens_seen")]
    # The next record's machine load: cpu_share where this trainer measures it, the node's load at each epoch end.
    metrics += [Metric("cpu_share", float(r.cpu_share), now + r.epoch, r.epoch) for r in history
                if math.isfinite(getattr(r, "cpu_share", math.nan))]
    metrics += [Metric("load_avg_1m", os.getloadavg()[0], now + r.epoch, r.epoch) for r in history]
    run_tags = [RunTag(CANDIDATE_TAG, model_cfg.candidate_activation if arch == "nlstm" and depth > 1 else "tanh"),
                RunTag(CODE_VERSION_TAG, CODE_VERSION), RunTag(CPUS_TAG, str(os.cpu_count())),
                RunTag(TAG + "threads", str(torch.get_num_threads()))]
    if state != "running":
        final = {"best_valid_bpc": result.best_valid_bpc, "test_bpc": result.test_bpc,
                 "num_params": model.num_params(), "tokens_per_s": result.tokens_per_s,
                 "train_time_s": result.train_time_s, "epochs_run": len(result.history)}
        if phase != "search":
            traces = memory_traces(model, corpus.test[:200])
            final |= memory_timescales(traces)
            folder = staging / rid
            folder.mkdir(parents=True)
            np.savez(folder / "memories.npz", text=np.array(corpus.vocab.decode(corpus.test[:200])),
                     **{f"level_{k}": t for k, t in enumerate(traces)})
            torch.save({"model_config": model_cfg.to_dict(), "state_dict": model.state_dict(),
                        "vocab": corpus.vocab.to_json()}, folder / "model.pt")
            client.log_artifacts(rid, str(folder))
        final["load_avg_max"] = max(m.value for m in metrics if m.key == "load_avg_1m")
        metrics += [Metric(k, float(v), now + 100, 0) for k, v in final.items()]
        run_tags += [RunTag(TAG + "status", state), RunTag(STOP_REASON_TAG, STOP_REASONS.get(result.stop_reason,
                                                                                            result.stop_reason))]
    client.log_batch(rid, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=run_tags)
    if state != "running":
        client.set_terminated(rid, "FINISHED")
    return rid


def build_layout_store(root: Path) -> str:
    """The same study as STUDY_YAML, trained with nlstm's Trainer and logged per docs/mlflow-layout.md."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    corpus = _corpus()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(STUDY, artifact_location=(root / "mlruns").as_uri())
    pid = client.create_run(exp_id, run_name=STUDY, tags={
        TAG + "kind": "study", TAG + "study": STUDY, TAG + "study_hash": "0" * 64}).info.run_id
    client.log_batch(pid, params=[Param(k, str(v)) for k, v in {
        "corpus": "synthetic", "data_fingerprint": corpus.fingerprint, "metric": "valid_bpc", "sampler": "random",
        "scheduler": "none", "num_samples": 3}.items()])
    staging = root / "staging"
    for arch, lr in (("nlstm", 3e-2), ("stacked", 4e-2), ("single", 5e-2)):
        log_trial(client, exp_id, pid, corpus, phase="search", arch=arch, depth=1 if arch == "single" else 2,
                  seed=0, lr=lr, epochs=1, staging=staging)
    client.set_tag(pid, TAG + "phase.search", "done")
    for arch in ("nlstm", "stacked"):
        for depth in (2, 3):
            config = {"arch": arch, "depth": depth, "budget": BUDGET, "lr": TRAIN["lr"]}
            chash = _config_hash(config)
            crun = client.create_run(exp_id, run_name=f"ablation-{arch}-d{depth}", tags={
                "mlflow.parentRunId": pid, TAG + "kind": "config", TAG + "phase": "ablation",
                TAG + "config_hash": chash, TAG + "arch": arch, TAG + "depth": str(depth),
                TAG + "family": f"{arch}-d{depth}", TAG + "factor.arch": arch, TAG + "factor.depth": str(depth)})
            client.log_batch(crun.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])
            for seed in SEEDS:
                log_trial(client, exp_id, crun.info.run_id, corpus, phase="ablation", arch=arch, depth=depth,
                          seed=seed, config_hash=chash, staging=staging)
            client.set_terminated(crun.info.run_id, "FINISHED")
    client.set_tag(pid, TAG + "phase.ablation", "done")
    client.set_terminated(pid, "FINISHED")
    shutil.rmtree(staging, ignore_errors=True)
    return uri


def run_study_runner(root: Path) -> str:
    """The real thing: ``python study/run.py --space tiny.yaml`` in ``root`` (its default store ./mlflow.db)."""
    (root / "tiny.yaml").write_text(STUDY_YAML)
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "study" / "run.py"), "--space", "tiny.yaml"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"study/run.py exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return f"sqlite:///{root / 'mlflow.db'}"


def add_unfinished_trials(uri: str, root: Path) -> None:
    """A 4th seed of nlstm-d3 still training (one epoch logged) and a failed trial, as a running study has."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(STUDY)
    config = client.search_runs([exp.experiment_id], filter_string=(
        "tags.`nlstm.kind` = 'config' and tags.`nlstm.family` = 'nlstm-d3'"))[0]
    parent_id = config.data.tags["mlflow.parentRunId"]
    log_trial(client, exp.experiment_id, config.info.run_id, _corpus(), phase="ablation", arch="nlstm", depth=3,
              seed=max(SEEDS) + 1, state="running", config_hash=config.data.tags["nlstm.config_hash"],
              staging=root / "staging")
    log_trial(client, exp.experiment_id, parent_id, _corpus(), phase="search", arch="nlstm", depth=2, seed=0,
              lr=0.9, state="failed", staging=root / "staging")
    client.update_run(parent_id, status="RUNNING")  # the study is "still running"


def build_study_store(root: Path) -> str:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the machine's cores are shared
    try:
        use_runner = (ROOT / "study" / "run.py").is_file() and os.environ.get("NLSTM_DASHBOARD_STORE") != "layout"
        uri = run_study_runner(root) if use_runner else build_layout_store(root)
        add_unfinished_trials(uri, root)
    finally:
        torch.set_num_threads(threads)
    return uri


# ---------------------------------------------------------------------------- fixtures
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return build_study_store(tmp_path_factory.mktemp("study"))


def run_report_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run([sys.executable, str(ROOT / "study" / "write_report.py"), *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=120)


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    proc = run_report_cli("--study", STUDY, "--tracking-uri", store, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "report:" in proc.stdout
    return out


@pytest.fixture(scope="module")
def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(store)


def completed_runs(client, **tags) -> list:
    """Completed trial runs with these nlstm.* tags, found with MLflow's own search (not through dashboards)."""
    exp = client.get_experiment_by_name(STUDY)
    where = " and ".join([f"tags.`nlstm.{k}` = '{v}'" for k, v in {"kind": "trial", "status": "completed",
                                                                       **tags}.items()])
    return list(client.search_runs([exp.experiment_id], filter_string=where, max_results=1000))


def t_ci(values) -> tuple[float, float, float]:
    x = np.asarray(values, dtype=float)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(low), float(high)


def md_table(markdown: str, caption: str) -> list[dict[str, str]]:
    """The rows of the Markdown table that follows ``**caption**``."""
    lines = markdown.split(f"**{caption}**", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")], strict=True)))
    return rows


def budget_label(budget: float) -> str:
    from dashboards.stats import format_budget

    return format_budget(budget)


# ---------------------------------------------------------------------------- the numbers
def test_statistics_helpers_agree_with_scipy():
    from dashboards.stats import t_interval

    values = [1.31, 1.35, 1.29, 1.40]
    ci = t_interval(values)
    assert (ci.mean, ci.low, ci.high) == pytest.approx(t_ci(values))
    assert math.isnan(t_interval([1.3]).low) and t_interval([]).n == 0


def test_verdict_refuses_thin_evidence():
    from dashboards.stats import PAIRED, ArmRecord, Comparison, Interval, verdict

    def say(n: int, diff: Interval, p: float, test: str = PAIRED, silent: bool = False, unstable: int = 0) -> str:
        c = Comparison("ablation", 1e6, "nlstm-d2", "stacked-d2", "test_bpc", test, n, n, diff, math.nan, n - 1, p,
                       "", "")
        nested = ArmRecord("nlstm-d2", "ablation", 5, 0 if silent else 5, unstable, "none of 5")
        return verdict(c, "test BPC", nested, ArmRecord("stacked-d2", "ablation", 5, 5, 0, "none of 5"))

    few = say(2, Interval(-0.05, -0.09, -0.01, 2, 0.01), 0.04)
    assert "too few seeds" in few and "no winner" in few
    overlap = say(5, Interval(-0.01, -0.03, 0.01, 5, 0.02), 0.3)
    assert "includes 0" in overlap and "no winner" in overlap
    none = say(0, Interval(math.nan, math.nan, math.nan, 0, math.nan), math.nan)
    assert "cannot be compared" in none
    clear = say(5, Interval(-0.05, -0.07, -0.03, 5, 0.01), 0.001)
    assert clear.startswith("nlstm-d2 has a lower test BPC than stacked-d2") and "paired t-test" in clear
    assert clear.endswith("Runs excluded: nlstm-d2 none of 5; stacked-d2 none of 5.")
    assert "did not learn in any" in say(0, Interval(math.nan, math.nan, math.nan, 0, math.nan), math.nan,
                                         silent=True)
    assert "no winner" in say(5, Interval(-0.05, -0.07, -0.03, 5, 0.01), 0.001, unstable=1)


def expected_states(client) -> dict[str, int]:
    """Trial runs per state, counted straight from MLflow: the nlstm.status tag, else the run's status."""
    exp = client.get_experiment_by_name(STUDY)
    counts = dict.fromkeys(("completed", "running", "pruned", "failed"), 0)
    for run in client.search_runs([exp.experiment_id], filter_string="tags.`nlstm.kind` = 'trial'", max_results=1000):
        tag = run.data.tags.get("nlstm.status")
        counts[tag if tag in ("completed", "pruned", "failed") else
               "running" if run.info.status == "RUNNING" else "failed"] += 1
    return counts


def test_loaded_frames_follow_the_layout(store, client):
    from dashboards import load_study
    from dashboards.load import epoch_frame

    data = load_study(STUDY, store)
    assert data.parent is not None and data.phases_done == ["search", "ablation"]
    states = data.trials.groupby("state").size().reindex(list(expected_states(client)), fill_value=0).to_dict()
    assert states == expected_states(client) and states["running"] == 1 and states["failed"] >= 1
    assert {"lr", "budget"} <= set(data.param_names)
    epochs = epoch_frame(data)
    running = data.trials.loc[data.trials["state"] == "running", "run_id"].item()
    assert sorted(epochs.loc[epochs["run_id"] == running, "epoch"]) == [1]
    done = data.trials.loc[(data.trials["phase"] == "ablation") & (data.trials["state"] == "completed"), "run_id"]
    assert len(done) == 4 * len(SEEDS)
    assert set(epochs.loc[epochs["run_id"].isin(done), "epoch"]) == set(range(1, EPOCHS + 1))
    ablation = data.trials[data.trials["phase"] == "ablation"]
    assert (ablation["factor.depth"].astype(int) == ablation["depth"].astype(int)).all()
    assert {f"timescale_l{k}" for k in range(3)} <= set(data.trials.columns)


def test_arm_table_matches_the_runs(report, client):
    import pandas as pd

    long = pd.read_csv(report / "tables" / "arms.csv")  # one row per arm x split (valid, test[, test_closers])
    md_rows = md_table((report / "report.md").read_text(), "Per arm: mean and 95 % t-interval over seeds")
    # the study runner's store is on the synthetic corpus, so its trials have the long-range probe too
    probed = any("closer_bpc" in r.data.metrics for r in completed_runs(client))
    splits = (["valid", "test", "test_closers"] if probed else ["valid", "test"]) + ["valid_equal_time"]
    assert len(long) == len(splits) * len(md_rows) == len(splits) * 4  # nesting and stacking at depths 2 and 3
    assert list(long["split"]) == splits * 4
    assert set(long["protocol"]) == {"ablation"} and (long["n_did_not_learn"] == 0).all()
    entropy = _corpus().unigram_entropy_bits()  # the stricter bar, should a study record it: still cleared
    bpc = long[long["split"].isin(["valid", "test"])]
    assert (bpc["bpc_ci95_high"] < entropy).all(), (entropy, long)
    arms = long[long["split"] == "valid"]
    for (_, arm), row in zip(arms.iterrows(), md_rows, strict=True):
        runs = [r for r in completed_runs(client, family=arm["family"], config_hash=arm["config_hash"])
                if r.data.tags["nlstm.phase"] in ("evaluate", "ablation")]
        assert len(runs) == arm["n_seeds"] == int(row["seeds"]) == len(SEEDS)  # the running 4th seed is left out
        for metric, split, cell in (("best_valid_bpc", "valid", "valid BPC [95 % CI]"),
                                    ("test_bpc", "test", "test BPC [95 % CI]"),
                                    *([("closer_bpc", "test_closers", "closer BPC [95 % CI]")] if probed else [])):
            mean, low, high = t_ci([r.data.metrics[metric] for r in runs])
            got = long[(long["family"] == arm["family"]) & (long["split"] == split)].iloc[0]
            assert (got["bpc_mean"], got["bpc_ci95_low"], got["bpc_ci95_high"]) == pytest.approx(
                (mean, low, high), abs=1e-9)
            assert row[cell] == f"{mean:.3f} [{low:.3f}, {high:.3f}]"
        assert row["family"] == arm["family"] and row["budget"] == budget_label(arm["budget"])
        still = "; 1 still running" if arm["family"] == "nlstm-d3" else ""  # the 4th seed: counted, not excluded
        assert row["excluded runs"] == arm["excluded"] == f"none of {len(SEEDS)}{still}"
        assert row["parameters"] == f"{runs[0].data.metrics['num_params']:,.0f}"
        assert row["tokens/s"] == f"{np.mean([r.data.metrics['tokens_per_s'] for r in runs]):,.0f}"
    # Equal training time, recomputed from MLflow's own metric histories: T* is the shortest run's final training
    # time over every arm's runs (one protocol, one budget here), each run's valid BPC interpolated there.
    curves = {}
    for _, arm in arms.iterrows():
        for r in completed_runs(client, family=arm["family"], config_hash=arm["config_hash"]):
            if r.data.tags["nlstm.phase"] in ("evaluate", "ablation"):
                times, bpc = ([m.value for m in sorted(client.get_metric_history(r.info.run_id, key),
                                                       key=lambda m: m.step) if m.step >= 1]
                              for key in ("train_time_s", "valid_bpc"))
                curves.setdefault(arm["family"], []).append((np.array(times), np.array(bpc)))
    t_star = min(times[-1] for runs in curves.values() for times, _ in runs)
    timed = long[long["split"] == "valid_equal_time"].set_index("family")
    assert timed["equal_time_s"].to_numpy() == pytest.approx(t_star)
    for family, runs in curves.items():
        at = [np.interp(t_star, times, bpc) for times, bpc in runs if times[0] <= t_star]
        assert timed.loc[family, "n_seeds"] == len(at)
        assert timed.loc[family, "n_no_eval_before_equal_time"] == len(runs) - len(at)
        if at:
            assert timed.loc[family, "bpc_mean"] == pytest.approx(np.mean(at), abs=1e-9)


def test_paired_differences_match_the_runs(report, client):
    import pandas as pd

    md = (report / "report.md").read_text()
    arms = pd.read_csv(report / "tables" / "arms.csv")
    arms = arms[arms["split"] == "test"]
    rows = md_table(md, "Differences between arms of one protocol (nested - other; negative: the Nested LSTM is "
                        "better)")
    tested = [r for r in rows if r["metric"] == "test BPC"]
    assert {r["comparison"] for r in tested} == {"nlstm-d2 - stacked-d2", "nlstm-d3 - stacked-d3"}
    for row in tested:
        per_seed = []
        for family in row["comparison"].split(" - "):
            arm = arms[(arms["family"] == family) & (arms["budget"].map(budget_label) == row["budget"])].iloc[0]
            per_seed.append({r.data.tags["nlstm.seed"]: r.data.metrics["test_bpc"]
                             for r in completed_runs(client, family=family, config_hash=arm["config_hash"])})
        seeds = sorted(set(per_seed[0]) & set(per_seed[1]))
        a, b = (np.array([d[s] for s in seeds]) for d in per_seed)
        mean, low, high = t_ci(a - b)
        assert row["seeds"] == f"{len(seeds)} pairs" and len(seeds) == len(SEEDS) and row["protocol"] == "ablation"
        assert row["mean diff"] == f"{mean:+.3f}" and row["95 % CI"] == f"[{low:+.3f}, {high:+.3f}]"
        assert row["p"] == f"{stats.ttest_rel(a, b).pvalue:.3g}" and row["test"] == "paired t-test"
        nested, other = row["comparison"].split(" - ")
        sentence = next(line for line in md.splitlines()
                        if line.startswith("- ") and nested in line and other in line and "test BPC" in line)
        assert ("no winner is declared" in sentence) == (low <= 0 <= high), sentence
    assert "paired t-test (two-sided, scipy.stats.ttest_rel)" in md


def test_report_counts_unfinished_runs(report, client):
    md = (report / "report.md").read_text()
    counts = expected_states(client)
    row = {r["phase"]: r for r in md_table(md, "Trial runs per phase and state")}["all"]
    assert {k: int(v) for k, v in row.items() if k != "phase"} == counts | {"total": sum(counts.values())}
    assert f"{counts['running']} running" in md and "left out of every statistic" in md
    assert "diverged: training loss became nan" in md  # the failed run's reason is listed
    excluded = md_table(md, "Excluded runs")
    assert [(r["phase"], r["outcome"]) for r in excluded] == [("search", "did not learn")]


# ---------------------------------------------------------------------------- the documents
def drawn_figures(client) -> int:
    """Figures with data in this store: all 8 when its runs recorded the long-range probe (the study runner's, on
    the synthetic corpus), else all but figure 7 (the layout logger's)."""
    return 8 if any("closer_bpc" in r.data.metrics for r in completed_runs(client)) else 7


def test_markdown_references_existing_figures(report, client):
    md = (report / "report.md").read_text()
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(refs) == drawn_figures(client), md
    for ref in refs:
        path = report / ref
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", ref
    assert "could not be drawn" not in md and md.count("Not shown") == 8 - drawn_figures(client)
    captions = re.findall(r"^_Figure (\d)\. (.+)_$", md, flags=re.M)
    assert [n for n, _ in captions] == [n for n in "12345678" if n != "7" or drawn_figures(client) == 8]
    assert all("runs" in c or "trials" in c for _, c in captions)


def test_report_is_logged_to_the_parent_run(report, client):
    exp = client.get_experiment_by_name(STUDY)
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`nlstm.kind` = 'study'")[0]
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/figures", "report/tables"} <= logged
    figures = {f.path for f in client.list_artifacts(parent.info.run_id, "report/figures")}
    assert len(figures) == drawn_figures(client)


def test_html_is_self_contained(report, client):
    page = (report / "report.html").read_text()
    refs = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)["']""", page)
    assert len([r for r in refs if r.startswith("data:image/png;base64,")]) == drawn_figures(client)
    assert all(r.startswith(("data:", "#")) for r in refs), [r[:60] for r in refs if not r.startswith("data:")]
    assert "Content-Security-Policy" in page and "<link" not in page


def chromium_image_sizes(page: Path, tmp_path: Path) -> list[list]:
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=90)
    match = re.search(r'<pre id="image-check"[^>]*>([^<]*)</pre>', proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(match.group(1) or "[]")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs Debian's package as root)")
def test_html_renders_every_figure_in_headless_chromium(report, tmp_path, client):
    sizes = chromium_image_sizes(report / "report.html", tmp_path)
    assert len(sizes) == drawn_figures(client) and all(w > 0 and h > 0 for _, w, h in sizes), sizes
    # The check itself catches a broken image: corrupt one and it reports a zero natural size.
    broken = tmp_path / "broken.html"
    page = (report / "report.html").read_text()
    broken.write_text(page.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1))
    sizes = chromium_image_sizes(broken, tmp_path)
    assert sorted(w for _, w, _ in sizes)[0] == 0


# ---------------------------------------------------------------------------- errors and thin data
def test_cli_refuses_unknown_study_and_store(store, tmp_path, capsys):
    from study.write_report import main  # in-process; the subprocess below checks the script itself

    assert main(["--study", "no-such-study", "--tracking-uri", store, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no study 'no-such-study'" in err and STUDY in err
    proc = run_report_cli("--study", STUDY, cwd=tmp_path)  # default store: ./mlflow.db, which does not exist
    assert proc.returncode == 2 and proc.stderr.startswith("error: no MLflow store at sqlite:///")
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "studies").exists()


def test_figures_degrade_to_sentences_without_their_data(store, tmp_path, client):
    import dataclasses

    from dashboards import load_study
    from dashboards.report import write_report

    data = load_study(STUDY, store)
    # Mid-search: only search trials, one budget, no evaluate/ablation phase, no memories.
    search_only = dataclasses.replace(data, trials=data.trials[data.trials["phase"] == "search"].reset_index(drop=True))
    files = write_report(search_only, tmp_path / "search-only", log_to_parent=False)
    md = files.markdown.read_text()
    assert "No evaluate or ablation runs have finished yet" in md
    assert "Only one budget has completed runs" in md
    assert "No run has memory-timescale metrics yet" in md
    assert "no winner is declared" in md or "cannot be compared yet" in md  # search trials: one seed each
    assert len(files.figures) == drawn_figures(client) - 1  # all but 6 (no timescales on search trials)
    # Nothing at all yet: every figure is a sentence, the report still renders.
    empty = dataclasses.replace(data, trials=data.trials.iloc[0:0], histories=data.histories.iloc[0:0])
    files = write_report(empty, tmp_path / "empty", log_to_parent=False)
    md = files.markdown.read_text()
    assert files.figures == [] and md.count("_Not shown:_") == 8
    assert "No arm has a finished run yet." in md and "could not be drawn" not in md


def test_trials_csv_has_one_row_per_trial_run_with_the_documented_columns(report, client):
    trials = pd.read_csv(report / "tables" / "trials.csv")
    required = ["study", "phase", "family", "arch", "depth", "budget", "num_params", "seed", "status", "valid_bpc",
                "test_bpc", "train_time_s", "tokens_per_s"]
    assert set(required) <= set(trials.columns) and trials.columns.is_unique, list(trials.columns)
    exp = client.get_experiment_by_name(STUDY)
    runs = list(client.search_runs([exp.experiment_id], "tags.`nlstm.kind` = 'trial'", max_results=1000))
    assert len(trials) == len(runs) and set(trials["run_id"]) == {r.info.run_id for r in runs}
    text = pd.read_csv(report / "tables" / "trials.csv", dtype=str, keep_default_na=False)
    for column in ("depth", "budget", "num_params", "seed"):  # integers as integers, not 20000.0
        assert text[column].str.fullmatch(r"\d*").all(), (column, text[column].tolist())
    for column in ("candidate_activation", "stop_reason", "stop_reason_source", "code_version"):
        assert column in trials, column
    for r in runs:
        row = trials[trials["run_id"] == r.info.run_id].iloc[0]
        assert row["family"] == r.data.tags["nlstm.family"] and row["status"] == r.data.tags["nlstm.status"]
        assert row["phase"] == r.data.tags["nlstm.phase"]
        for column, tag in (("candidate_activation", CANDIDATE_TAG), ("stop_reason", STOP_REASON_TAG),
                            ("code_version", CODE_VERSION_TAG)):  # the next record's tags, where the store has them
            if tag in r.data.tags:
                assert row[column] == r.data.tags[tag], (column, row[column], r.data.tags[tag])
        if "best_valid_bpc" in r.data.metrics:
            assert row["valid_bpc"] == pytest.approx(r.data.metrics["best_valid_bpc"])
