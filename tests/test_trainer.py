"""The trainer learns, resumes bit-identically, stops when told to, and fails loudly on divergence."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlstm import CharLM, ModelConfig
from nlstm.data import SyntheticConfig, synthetic_corpus
from nlstm.train import main as train_main
from nlstm.trainer import (
    DivergenceError,
    NotLearningError,
    PeriodicCheckpoint,
    SettingsMismatchError,
    TrainConfig,
    Trainer,
    bits_per_char,
    learning_failure,
    seed_everything,
)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(SyntheticConfig(seed=0, train_chars=40_000, valid_chars=4_000, test_chars=4_000))


def make_trainer(corpus, arch="nlstm", depth=2, callbacks=None, seed=0, init_seed=None, **train):
    seed_everything(seed if init_seed is None else init_seed)
    model = CharLM(ModelConfig(vocab_size=len(corpus.vocab), arch=arch, depth=depth, width=48, embedding_dim=16,
                               dropout=0.1))
    cfg = TrainConfig(**({"epochs": 2, "batch_size": 16, "bptt": 32, "lr": 5e-3, "seed": seed} | train))
    return Trainer(model, corpus, cfg, callbacks)


@pytest.mark.parametrize("arch,depth", [("nlstm", 2), ("stacked", 2)])
def test_learns_well_below_unigram_entropy(corpus, arch, depth):
    # learn_after_steps=1: the unigram bar of the "did not learn" rule applies from the first epoch on
    trainer = make_trainer(corpus, arch, depth, epochs=3, max_steps_per_epoch=40, learn_after_steps=1)
    result = trainer.fit()
    unigram = corpus.unigram_entropy_bits()
    assert result.best_valid_bpc < 0.7 * unigram, (result.best_valid_bpc, unigram)
    assert result.test_bpc is not None and result.test_bpc < 0.7 * unigram
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert result.history[-1].train_bpc < result.history[0].train_bpc
    windows = trainer.train_batches  # 120 steps over 78 windows: the stream wraps once, past its shorter last window
    assert result.tokens_seen == sum(windows[i % len(windows)][1].numel() for i in range(120)) > 0
    assert result.tokens_per_s > 0


class StopAt:
    """Simulates a killed run: raises after a given step, once the checkpoint of that step is written."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, loss):
        if step == self.step:
            raise KeyboardInterrupt


def test_resume_mid_epoch_is_bit_identical(corpus, tmp_path):
    straight = make_trainer(corpus, epochs=2, max_steps_per_epoch=6)
    straight_result = straight.fit()

    ckpt = tmp_path / "ckpt.pt"
    interrupted = make_trainer(corpus, epochs=2, max_steps_per_epoch=6,
                               callbacks=[PeriodicCheckpoint(ckpt, every_steps=4), StopAt(8)])
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    resumed = make_trainer(corpus, epochs=2, max_steps_per_epoch=6, init_seed=123)  # other init: all must come back
    resumed.load_checkpoint(ckpt)
    assert (resumed.epoch, resumed.batch_index, resumed.global_step) == (1, 2, 8)
    resumed_result = resumed.fit()

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [r.valid_bpc for r in resumed_result.history] == [r.valid_bpc for r in straight_result.history]
    assert [r.train_bpc for r in resumed_result.history] == [r.train_bpc for r in straight_result.history]
    assert resumed_result.test_bpc == straight_result.test_bpc


class WindowSpy(Trainer):
    """Records which window of the training stream each step gets and whether it starts from a fresh state."""

    def train_step(self, x, y):
        self.fed = [*getattr(self, "fed", []), (self.stream_position, self.state is None)]
        assert torch.equal(x, self.train_batches[self.stream_position][0])
        return super().train_step(x, y)


def spy_trainer(corpus, **train):
    trainer = make_trainer(corpus, **train)
    trainer.__class__ = WindowSpy
    return trainer


def test_shortened_epochs_continue_along_the_stream(corpus):
    trainer = spy_trainer(corpus, epochs=3, max_steps_per_epoch=5)
    trainer.fit()
    assert [position for position, _ in trainer.fed] == list(range(15))  # not 0-4 three times
    assert [fresh for _, fresh in trainer.fed] == [True] + [False] * 14  # the state crosses epoch boundaries

    n = len(trainer.train_batches)  # 78 windows: epochs of 50 wrap once, restarting the stream with a fresh state
    wrapping = spy_trainer(corpus, epochs=2, max_steps_per_epoch=50)
    wrapping.fit()
    positions = [position for position, _ in wrapping.fed]
    assert positions == [*range(n), *range(100 - n)]
    assert [i for i, (_, fresh) in enumerate(wrapping.fed) if fresh] == [0, n]


def test_shortened_epochs_train_exactly_as_one_epoch_of_their_steps(corpus):
    """Validating after every 3 windows changes nothing about training: the same windows, states and updates."""
    split = make_trainer(corpus, epochs=2, max_steps_per_epoch=3)
    split.fit()
    whole = make_trainer(corpus, epochs=1, max_steps_per_epoch=6)
    whole.fit()
    for (name, a), b in zip(split.model.state_dict().items(), whole.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_checkpoint_from_before_the_continuing_stream(corpus, tmp_path):
    """Older checkpoints lack the stream position: exact with full epochs, refused with shortened ones."""
    ckpt = tmp_path / "ckpt.pt"
    first = make_trainer(corpus, epochs=2, max_steps_per_epoch=4)
    first.fit()
    state = first.state_dict()
    del state["progress"]["stream_position"]
    torch.save(state, ckpt)
    with pytest.raises(SettingsMismatchError, match="shortened epochs restarting the stream"):
        make_trainer(corpus, epochs=3, max_steps_per_epoch=4).load_checkpoint(ckpt)

    full = make_trainer(corpus, epochs=1, max_steps_per_epoch=None)
    full.fit()
    state = full.state_dict()
    del state["progress"]["stream_position"]
    torch.save(state, ckpt)
    resumed = make_trainer(corpus, epochs=2, max_steps_per_epoch=None)
    resumed.load_checkpoint(ckpt)
    assert resumed.stream_position == 0 and resumed.epoch == 1


def test_resume_refuses_other_settings_and_records_new_stopping_rules(corpus, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    first = make_trainer(corpus, epochs=1, max_steps_per_epoch=2, patience=3)
    first.fit()
    first.save_checkpoint(ckpt)

    def resume(corpus=corpus, **changes):
        trainer = make_trainer(corpus, **({"epochs": 1, "max_steps_per_epoch": 2, "patience": 3} | changes))
        return trainer, trainer.load_checkpoint(ckpt)

    for changes, message in [
        ({"lr": 0.01}, "lr 0.005 -> 0.01"),
        ({"bptt": 16, "seed": 4}, "bptt 32 -> 16, seed 0 -> 4"),
        ({"max_steps_per_epoch": 3}, "max_steps_per_epoch 2 -> 3"),
        ({"lr_schedule": "cosine", "epochs": 2}, "epochs 1 -> 2 \\(the cosine .*\\), lr_schedule constant -> cosine"),
    ]:
        with pytest.raises(SettingsMismatchError, match=f"ckpt.pt was written with other settings: {message}"):
            resume(**changes)
    with pytest.raises(SettingsMismatchError, match="arch nlstm -> stacked"):
        make_trainer(corpus, arch="stacked", epochs=1, max_steps_per_epoch=2, patience=3).load_checkpoint(ckpt)
    other_data = synthetic_corpus(SyntheticConfig(seed=1, train_chars=40_000, valid_chars=4_000, test_chars=4_000))
    with pytest.raises(SettingsMismatchError, match="data fingerprint"):
        resume(corpus=other_data)

    trainer, changes = resume(epochs=3, patience=5, time_budget_s=100.0, device="cpu", learn_margin_bits=0.2)
    assert changes == {"epochs": [1, 3], "patience": [3, 5], "time_budget_s": [None, 100.0],
                       "learn_margin_bits": [0.1, 0.2]}
    assert trainer.setting_changes == [{"epoch": 1, "global_step": 2, "changes": changes}]
    result = trainer.fit()
    assert len(result.history) == 3 and result.setting_changes == trainer.setting_changes


def test_epochs_cannot_change_under_cosine_nor_drop_below_the_completed_ones(corpus, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    cosine = make_trainer(corpus, epochs=2, max_steps_per_epoch=2, lr_schedule="cosine")
    cosine.fit()
    cosine.save_checkpoint(ckpt)
    with pytest.raises(SettingsMismatchError, match="epochs 2 -> 3 \\(the cosine schedule"):
        make_trainer(corpus, epochs=3, max_steps_per_epoch=2, lr_schedule="cosine").load_checkpoint(ckpt)
    plain = make_trainer(corpus, epochs=2, max_steps_per_epoch=2)
    plain.fit()
    plain.save_checkpoint(ckpt)
    with pytest.raises(SettingsMismatchError, match="epochs 2 -> 1 \\(2 already completed\\)"):
        make_trainer(corpus, epochs=1, max_steps_per_epoch=2).load_checkpoint(ckpt)


def test_divergence_raises_a_specific_error(corpus):
    trainer = make_trainer(corpus)
    with torch.no_grad():
        trainer.model.decoder.bias.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="loss became nan at epoch 1, step 1"):
        trainer.fit()


def test_a_run_that_does_not_learn_fails(corpus, tmp_path):
    """lr 50 "trains" to hundreds of BPC without a NaN (issue 8, item 7): a failure, not a result."""
    unigram = corpus.unigram_entropy_bits()
    saver = PeriodicCheckpoint(tmp_path / "c")
    trainer = make_trainer(corpus, epochs=2, max_steps_per_epoch=10, lr=50, callbacks=[saver])
    with pytest.raises(NotLearningError, match=rf"did not learn: valid BPC \d+\.\d+ after epoch 1 \(10 steps\), "
                                               rf"unigram entropy {unigram:.3f} bits; worse than uniform guessing"):
        trainer.fit()
    assert not (tmp_path / "c").exists()  # raised before the epoch was recorded
    assert issubclass(NotLearningError, DivergenceError)  # callers that record divergence record this too

    # A run that stays at its initial ~uniform BPC is caught by the unigram bar once it applies ...
    with pytest.raises(NotLearningError, match="must be 0.1 bits below it after 10 steps"):
        make_trainer(corpus, epochs=2, max_steps_per_epoch=10, lr=1e-6, learn_after_steps=10).fit()
    # ... but not before (tiny smoke runs), nor when the rule is off.
    assert len(make_trainer(corpus, epochs=2, max_steps_per_epoch=10, lr=1e-6).fit().history) == 2
    assert len(make_trainer(corpus, epochs=1, max_steps_per_epoch=10, lr=50, learn_check=False).fit().history) == 1


def test_learning_failure_boundaries():
    cfg = TrainConfig(learn_margin_bits=0.25, learn_after_steps=100)
    unigram, vocab = 3.0, 16  # uniform guessing: 4 bits
    def fails(bpc, step, c=cfg):
        return learning_failure(bpc, 2, step, unigram, vocab, c)

    # before learn_after_steps: only worse than uniform + 1 bit fails
    assert fails(5.0, 99) is None and fails(4.5, 0) is None
    assert "worse than uniform guessing (4.000 bits) by over 1 bit" in fails(5.0 + 1e-9, 99)
    assert fails(float("nan"), 99) is not None and fails(float("inf"), 0) is not None
    # from learn_after_steps on: strictly below unigram - margin, at every epoch (a later blow-up fails)
    assert fails(2.75 - 1e-9, 100) is None
    assert fails(2.75, 100) == ("did not learn: valid BPC 2.750 after epoch 2 (100 steps), unigram entropy 3.000 "
                                "bits (must be 0.25 bits below it after 100 steps)")
    assert fails(4.5, 5000) is not None and fails(float("nan"), 100) is not None
    assert fails(100.0, 5000, TrainConfig(learn_check=False)) is None
    with pytest.raises(ValueError, match="learn_margin_bits"):
        TrainConfig(learn_margin_bits=-0.1)


def test_cli_exit_code_3_when_not_learning(tmp_path, capsys):
    args = ["--corpus", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "5", "--width", "16", "--embedding-dim",
            "8", "--batch-size", "8", "--bptt", "16", "--quiet", "--sample", "0", "--lr", "50"]
    assert train_main([*args, "--out", str(tmp_path / "a")]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: did not learn: valid BPC") and err.count("\n") == 1, err
    assert train_main([*args, "--out", str(tmp_path / "b"), "--learn-check", "false"]) == 0


def test_early_stopping_and_time_budget(corpus):
    stalled = make_trainer(corpus, epochs=5, lr=1e-12, patience=1, max_steps_per_epoch=2).fit()
    assert stalled.stop_reason == "plateau" and len(stalled.history) == 2 and stalled.stopped_early

    timed = make_trainer(corpus, epochs=5, time_budget_s=1e-9).fit()
    assert timed.stop_reason == "time_budget" and len(timed.history) == 1 and timed.tokens_seen == 16 * 32


def test_bpc_of_a_uniform_model_is_log2_vocab(corpus):
    model = CharLM(ModelConfig(vocab_size=len(corpus.vocab), width=8, embedding_dim=4))
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.zero_()
    bpc = bits_per_char(model, corpus.valid[:1001], batch_size=7, bptt=13)
    assert bpc == pytest.approx(math.log2(len(corpus.vocab)), abs=1e-6)


def test_evaluation_counts_every_symbol(corpus):
    """Padding, not truncation: a model that is perfect on one symbol and uniform elsewhere shows it."""
    data = corpus.valid[:500]
    trainer = make_trainer(corpus, eval_batch_size=7, bptt=11)
    a = bits_per_char(trainer.model, data, 7, 11)
    b = bits_per_char(trainer.model, data, 1, 499)  # one stream, one window: the plain definition
    assert a == pytest.approx(b, rel=0.05)  # same symbols; only the carried-state boundaries differ


def run_cli(*args, cwd):
    """The CLI of this checkout (not whatever copy of nlstm the interpreter has installed)."""
    return subprocess.run([sys.executable, "-m", "nlstm.train", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def test_cli_trains_writes_outputs_and_resumes(tmp_path):
    args = ["--corpus", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "3", "--budget", "2e4",
            "--batch-size", "8", "--bptt", "16", "--out", str(tmp_path / "run"), "--quiet", "--sample", "20"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "epoch   1" in first.stdout and "width" in first.stdout and "sample:" in first.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["history"][0]["valid_bpc"] > 0
    again = run_cli(*args[:3], "2", *args[4:], cwd=tmp_path)  # two epochs now: resumes after the first
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout and "epoch   2" in again.stdout and "epoch   1" not in again.stdout
    assert "(epochs 1 -> 2)" in again.stdout
    recorded = [{"epoch": 1, "global_step": 3, "changes": {"epochs": [1, 2]}}]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["setting_changes"] == recorded
    assert json.loads((tmp_path / "run" / "result.json").read_text())["setting_changes"] == recorded

    other_lr = run_cli(*args[:3], "3", *args[4:], "--lr", "0.01", "--dropout", "0.1", cwd=tmp_path)
    assert other_lr.returncode == 2, other_lr.stdout + other_lr.stderr
    assert other_lr.stderr.strip().count("\n") == 0, other_lr.stderr
    assert "lr 0.002 -> 0.01" in other_lr.stderr and "dropout 0.0 -> 0.1" in other_lr.stderr
    assert "epochs" not in other_lr.stderr and "--fresh" in other_lr.stderr


@pytest.mark.parametrize("args,message", [
    (["--corpus", "nonsense"], "nonsense"),
    (["--corpus", "synthetic", "--optimizer", "rmsprop"], "optimizer"),
    (["--corpus", "text:/does/not/exist.txt"], "exist"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run_cli(*args, "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


@pytest.mark.parametrize(("arch", "prepared"), [("nlstm", True), ("stacked", False)])
def test_the_cpu_loops_are_built_before_the_training_clock_starts(corpus, monkeypatch, arch, prepared):
    """A first-use build of the C++ loops takes up to a minute: inside the first step it would be
    counted as training time (and tokens/s) of whichever trial came first."""
    import nlstm.trainer as trainer_module

    events = []
    monkeypatch.setattr(trainer_module, "prepare_cpu_loops", lambda: events.append("prepare") or True)
    trainer = make_trainer(corpus, arch=arch, epochs=1, max_steps_per_epoch=2)
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, y: events.append("step") or step(x, y))
    trainer.fit()
    assert events == (["prepare"] if prepared else []) + ["step", "step"]


def test_cpu_share_is_cpu_seconds_per_training_second_and_thread(corpus, monkeypatch):
    """A process that got half of each thread's time during its steps has cpu_share 0.5 (fake clocks: per
    step 1 s of wall time and 1 s of CPU time over 2 threads), and the share survives a checkpoint."""
    import nlstm.trainer as trainer_module

    class Clocks:
        wall = cpu = 0.0

        def perf_counter(self):
            self.wall += 0.5  # each step reads it twice: 1 s per step
            return self.wall

        def process_time(self):
            self.cpu += 0.5
            return self.cpu

    monkeypatch.setattr(trainer_module, "time", Clocks())
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    result = make_trainer(corpus, epochs=2, max_steps_per_epoch=3).fit()
    assert [round(r.cpu_share, 9) for r in result.history] == [0.5, 0.5]
