"""Truncated-BPTT training of a character language model, measured in bits per character.

The trainer knows nothing of Ray, MLflow or YAML (minGPT's rule): it takes a model that maps
``(tokens, state) -> (logits, state)`` and three token streams, and reports through callbacks.
Checkpoints hold everything that decides the future of the run (weights, optimizer, schedule,
RNG states, the data position and the carried recurrent state), so a resumed run continues
bit-identically on the same machine.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlstm.checkpoint import (
    CheckpointError,
    load_checkpoint_file,
    rng_states,
    save_checkpoint_file,
    set_rng_states,
)
from nlstm.data import StreamBatches, unigram_entropy_bits
from nlstm.fused.cpp import prepare as prepare_cpu_loops

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "plateau")
LN2 = math.log(2.0)
#: TrainConfig fields a resumed run may change. They decide only *when* training stops, never what a
#: step computes, so resuming with new values gives the straight run with those values; each change
#: is recorded in ``Trainer.setting_changes``. Except ``epochs`` under the cosine schedule, whose
#: learning-rate curve is laid out over the planned epochs.
STOPPING_RULES = ("epochs", "patience", "time_budget_s", "learn_check", "learn_margin_bits", "learn_after_steps")
#: Where the run executes, not what it computes: resuming elsewhere is allowed (the results then
#: agree to float rounding; bit-identity needs the same device).
NOT_COMPARED = ("device",)


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the run cannot continue meaningfully."""


class NotLearningError(DivergenceError):
    """The run finished epochs without learning (see ``learning_failure``): its numbers are not a
    result. A DivergenceError, so every caller that records divergence records this too."""


class SettingsMismatchError(CheckpointError):
    """A checkpoint written with other settings than the run resuming it (one line naming the keys)."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    bptt: int = 100
    eval_batch_size: int = 16
    optimizer: str = "adam"
    lr: float = 2e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm; 0 disables clipping
    lr_schedule: str = "constant"
    lr_decay: float = 0.5  # 'plateau': factor applied when valid BPC stops improving
    patience: int | None = 3  # early stopping after this many epochs without improvement; None: never
    min_delta: float = 1e-4  # an improvement smaller than this (in BPC) does not count
    # Shrink epochs to this many windows (smoke runs, quick searches, several validations per pass). Shortened
    # epochs continue along the training stream where the previous one stopped (wrapping at its end), so N of
    # them see N x steps distinct windows and the state carries across their boundaries, as within an epoch.
    max_steps_per_epoch: int | None = None
    max_eval_tokens: int | None = None  # evaluate on a prefix of valid/test (quick searches)
    time_budget_s: float | None = None  # stop after this much training time (time-matched comparisons)
    seed: int = 0
    device: str = "cpu"
    # "Did not learn" is a failure (NotLearningError), decided at each epoch's end by ``learning_failure``:
    # from the first epoch end after ``learn_after_steps`` optimizer steps the valid BPC must be at least
    # ``learn_margin_bits`` below the unigram entropy of the training split; before that only a blow-up
    # (more than 1 bit worse than uniform guessing) fails. Why steps, not epochs: a model first learns the
    # unigram distribution, which takes ~150-400 Adam steps at lr 3e-4 (PTB, measured), whatever the
    # batch; smoke and test runs of 10-75 steps are legitimately still above it.
    learn_check: bool = True
    learn_margin_bits: float = 0.1
    learn_after_steps: int = 1000

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        for name in ("epochs", "batch_size", "bptt", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.learn_margin_bits < 0 or self.learn_after_steps < 0:
            raise ValueError("learn_margin_bits and learn_after_steps must be >= 0")


@dataclass
class EpochResult:
    epoch: int  # 1-based
    train_bpc: float
    valid_bpc: float
    lr: float
    tokens_per_s: float  # training tokens per second of training time (evaluation excluded)
    train_time_s: float  # cumulative training time so far
    wall_time_s: float  # cumulative wall time so far, evaluation included
    tokens_seen: int  # cumulative training tokens
    # Process CPU seconds in training steps / (training seconds x torch threads), cumulative: about 1 when
    # the run had its CPUs, well below on a machine shared beyond its cores (its times are then no measurement).
    cpu_share: float = float("nan")


#: Why ``Trainer.fit`` stopped: the epoch cap, validation BPC that stopped improving (``patience``
#: validations without an improvement of ``min_delta``), or the training-time budget.
STOP_REASONS = ("max_epochs", "plateau", "time_budget")


@dataclass
class TrainResult:
    history: list[EpochResult]
    best_valid_bpc: float
    best_epoch: int
    test_bpc: float | None
    stopped_early: bool
    stop_reason: str
    train_time_s: float
    wall_time_s: float
    tokens_seen: int
    setting_changes: list[dict[str, Any]] = field(default_factory=list)  # see Trainer.setting_changes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_seen / self.train_time_s if self.train_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tokens_per_s": self.tokens_per_s}


class Callback(Protocol):
    """Any subset of these methods; the trainer calls the ones a callback has."""

    def on_step_end(self, trainer: Trainer, step: int, loss_bpc: float) -> None: ...
    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None: ...
    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Before ``learn_after_steps``, a run fails only if its valid BPC exceeds uniform guessing by this much:
#: a fresh model sits within ~0.3 bits of log2(vocabulary) (measured 5.06-5.11 for 34 symbols, uniform
#: 5.09), while learning rates of 10-100 give 30-440 BPC after 10-25 steps.
UNIFORM_SLACK_BITS = 1.0


def learning_failure(valid_bpc: float, epoch: int, global_step: int, unigram_bits: float, vocab_size: int,
                     cfg: TrainConfig) -> str | None:
    """Why a run with this valid BPC after ``epoch`` (``global_step`` steps so far) did not learn, or None.

    The bars, in bits per symbol: a model that ignores context scores the unigram entropy ``unigram_bits``
    of the training split, and one that guesses uniformly log2(``vocab_size``). Any run must end up
    clearly below the first (by ``cfg.learn_margin_bits``) once it has taken ``cfg.learn_after_steps``
    steps, and stay there (checked at every later epoch, so a later blow-up fails too); before that it
    fails only when it is worse than uniform guessing by more than ``UNIFORM_SLACK_BITS``.
    """
    if not cfg.learn_check:
        return None
    where = (f"valid BPC {valid_bpc:.3f} after epoch {epoch} ({global_step} steps), "
             f"unigram entropy {unigram_bits:.3f} bits")
    if global_step >= cfg.learn_after_steps:
        if not valid_bpc < unigram_bits - cfg.learn_margin_bits:  # NaN fails too
            return f"did not learn: {where} (must be {cfg.learn_margin_bits:g} bits below it after " \
                   f"{cfg.learn_after_steps} steps)"
        return None
    uniform = math.log2(vocab_size)
    if not valid_bpc <= uniform + UNIFORM_SLACK_BITS:
        return f"did not learn: {where}; worse than uniform guessing ({uniform:.3f} bits) by over " \
               f"{UNIFORM_SLACK_BITS:g} bit"
    return None


def _map_state(state: Any, fn) -> Any:
    """Apply ``fn`` to every tensor of a core's state, whatever its nesting of tuples and lists."""
    if isinstance(state, Tensor):
        return fn(state)
    if isinstance(state, (tuple, list)):
        return type(state)(_map_state(s, fn) for s in state)
    return state


def detach_state(state: Any) -> Any:
    """Cut the graph at a truncated-BPTT boundary."""
    return _map_state(state, Tensor.detach)


def _state_to(state: Any, device: torch.device | str) -> Any:
    return _map_state(state, lambda t: t.to(device))


class Trainer:
    """Train ``model`` on ``data.train``, select on ``data.valid``, report ``data.test`` at the end."""

    def __init__(self, model: nn.Module, data: Any, cfg: TrainConfig, callbacks: list[Any] | None = None) -> None:
        self.model = model.to(cfg.device)
        self.data = data
        self.cfg = cfg
        self.callbacks = list(callbacks or [])
        self.train_batches = StreamBatches(data.train, cfg.batch_size, cfg.bptt)
        if len(self.train_batches) == 0:
            raise ValueError(f"training stream of {len(data.train)} tokens is too short for batch {cfg.batch_size}")
        self.steps_per_epoch = min(len(self.train_batches), cfg.max_steps_per_epoch or len(self.train_batches))
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.vocab_size = len(data.vocab)
        self.unigram_bits = unigram_entropy_bits(data.train, self.vocab_size)  # the bar of learning_failure
        # Progress: everything a checkpoint must restore to continue identically.
        self.epoch = 0  # completed epochs
        self.batch_index = 0  # next batch within the current epoch
        self.stream_position = 0  # next window of the training stream (shortened epochs continue from it)
        self.global_step = 0
        self.state: Any = None  # recurrent state carried across training windows
        self.history: list[EpochResult] = []
        self.best_valid_bpc = math.inf
        self.best_epoch = 0
        self.epochs_without_improvement = 0
        self.train_time_s = 0.0
        self.wall_time_s = 0.0
        self.train_cpu_time_s = 0.0  # process CPU time in training steps (all threads): see EpochResult.cpu_share
        self.tokens_seen = 0
        self._epoch_loss_sum = 0.0  # sum of per-window mean losses (nats) in the current epoch
        self._epoch_windows = 0
        self.best_state_dict: dict[str, Tensor] | None = None
        # Stopping rules changed on resume: [{"epoch", "global_step", "changes": {key: [old, new]}}].
        self.setting_changes: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- construction
    def _make_optimizer(self) -> torch.optim.Optimizer:
        params, c = self.model.parameters(), self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def _make_scheduler(self):
        c = self.cfg
        if c.lr_schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs * self.steps_per_epoch)
        if c.lr_schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=c.lr_decay, patience=0)
        return None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _emit(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method(self, *args)

    # ---------------------------------------------------------------- training
    def train_step(self, x: Tensor, y: Tensor) -> float:
        """One truncated-BPTT window; returns its mean loss in nats."""
        self.model.train()
        x, y = x.to(self.cfg.device), y.to(self.cfg.device)
        logits, state = self.model(x, self.state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        value = loss.item()
        if not math.isfinite(value):
            raise DivergenceError(
                f"training loss became {value} at epoch {self.epoch + 1}, step {self.global_step + 1} (lr {self.lr:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        if self.cfg.lr_schedule == "cosine":
            self.scheduler.step()
        self.state = detach_state(state)
        return value

    def fit(self) -> TrainResult:
        """Train until the epochs, the patience or the time budget run out (resumes mid-epoch)."""
        if str(self.cfg.device).startswith("cpu") and any(getattr(m, "impl", None) == "fused"
                                                          for m in self.model.modules()):
            prepare_cpu_loops()  # a first-use build of the C++ loops is not training time
        stop_reason = "max_epochs"
        while self.epoch < self.cfg.epochs:
            if self._out_of_time():
                stop_reason = "time_budget"
                break
            while self.batch_index < self.steps_per_epoch and not self._out_of_time():
                start, cpu_start = time.perf_counter(), time.process_time()
                x, y = self.train_batches[self.stream_position]
                loss = self.train_step(x, y)
                self.train_time_s += time.perf_counter() - start
                self.train_cpu_time_s += time.process_time() - cpu_start
                self.tokens_seen += y.numel()
                self.batch_index += 1
                self._advance_stream()
                self.global_step += 1
                self._epoch_loss_sum += loss
                self._epoch_windows += 1
                self.wall_time_s += time.perf_counter() - start
                self._emit("on_step_end", self.global_step, loss / LN2)
            self._end_epoch()
            if self._should_stop_early():
                stop_reason = "plateau"
                break
        return self._finish(stop_reason)

    def _advance_stream(self) -> None:
        """Next window; at the stream's end start it again with a fresh state (its first window follows no text)."""
        self.stream_position = (self.stream_position + 1) % len(self.train_batches)
        if self.stream_position == 0:
            self.state = None

    def _out_of_time(self) -> bool:
        return self.cfg.time_budget_s is not None and self.train_time_s >= self.cfg.time_budget_s

    def _end_epoch(self) -> EpochResult:
        start = time.perf_counter()
        valid_bpc = self.evaluate("valid")
        failure = learning_failure(valid_bpc, self.epoch + 1, self.global_step, self.unigram_bits, self.vocab_size,
                                   self.cfg)
        if failure is not None:  # raised before anything is recorded: no checkpoint of a failed run
            raise NotLearningError(f"{failure} (lr {self.lr:g})")
        self.epoch += 1
        train_bpc = self._epoch_loss_sum / max(self._epoch_windows, 1) / LN2
        if valid_bpc < self.best_valid_bpc - self.cfg.min_delta:
            self.best_valid_bpc, self.best_epoch, self.epochs_without_improvement = valid_bpc, self.epoch, 0
            self.best_state_dict = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.epochs_without_improvement += 1
        if self.cfg.lr_schedule == "plateau":
            self.scheduler.step(valid_bpc)
        self.wall_time_s += time.perf_counter() - start
        result = EpochResult(
            epoch=self.epoch, train_bpc=train_bpc, valid_bpc=valid_bpc, lr=self.lr,
            tokens_per_s=self.tokens_seen / self.train_time_s if self.train_time_s > 0 else 0.0,
            train_time_s=self.train_time_s, wall_time_s=self.wall_time_s, tokens_seen=self.tokens_seen,
            cpu_share=self.cpu_share,
        )
        self.history.append(result)
        self.batch_index, self._epoch_loss_sum, self._epoch_windows = 0, 0.0, 0
        self._emit("on_epoch_end", result)
        return result

    @property
    def cpu_share(self) -> float:
        """CPU seconds the process spent in training steps per training second and torch thread."""
        if self.train_time_s <= 0:
            return float("nan")
        return self.train_cpu_time_s / (self.train_time_s * max(1, torch.get_num_threads()))

    def _should_stop_early(self) -> bool:
        return self.cfg.patience is not None and self.epochs_without_improvement >= self.cfg.patience

    def _finish(self, stop_reason: str) -> TrainResult:
        if self.best_state_dict is not None:
            self.model.load_state_dict(self.best_state_dict)  # test the model selected on valid
        start = time.perf_counter()
        test_bpc = self.evaluate("test") if len(self.data.test) > 1 else None
        self.wall_time_s += time.perf_counter() - start
        result = TrainResult(
            history=list(self.history), best_valid_bpc=self.best_valid_bpc, best_epoch=self.best_epoch,
            test_bpc=test_bpc, stopped_early=stop_reason != "max_epochs", stop_reason=stop_reason,
            train_time_s=self.train_time_s, wall_time_s=self.wall_time_s, tokens_seen=self.tokens_seen,
            setting_changes=list(self.setting_changes),
        )
        self._emit("on_train_end", result)
        return result

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float:
        """BPC over every symbol of the split (spec): streams padded, never truncated, and the
        state carried across consecutive windows as in training."""
        data = getattr(self.data, split)
        if self.cfg.max_eval_tokens is not None:
            data = data[: self.cfg.max_eval_tokens]
        return bits_per_char(self.model, data, self.cfg.eval_batch_size, self.cfg.bptt, self.cfg.device)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_states(),
            "progress": {
                "epoch": self.epoch, "batch_index": self.batch_index, "global_step": self.global_step,
                "stream_position": self.stream_position,
                "best_valid_bpc": self.best_valid_bpc, "best_epoch": self.best_epoch,
                "epochs_without_improvement": self.epochs_without_improvement,
                "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s,
                "tokens_seen": self.tokens_seen, "epoch_loss_sum": self._epoch_loss_sum,
                "train_cpu_time_s": self.train_cpu_time_s,
                "epoch_windows": self._epoch_windows,
            },
            "state": _state_to(self.state, "cpu"),
            "history": [asdict(r) for r in self.history],
            "best_state_dict": self.best_state_dict,
            "train_config": asdict(self.cfg),
            "model_config": _model_config(self.model),
            "data_fingerprint": getattr(self.data, "fingerprint", None),
            "setting_changes": self.setting_changes,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        p = ckpt["progress"]
        self.epoch, self.batch_index, self.global_step = p["epoch"], p["batch_index"], p["global_step"]
        # Checkpoints from before shortened epochs continued the stream: with full epochs both agree (the
        # position is the batch index); _changed_settings refuses the others.
        self.stream_position = p.get("stream_position", p["batch_index"])
        self.best_valid_bpc, self.best_epoch = p["best_valid_bpc"], p["best_epoch"]
        self.epochs_without_improvement = p["epochs_without_improvement"]
        self.train_time_s, self.wall_time_s, self.tokens_seen = p["train_time_s"], p["wall_time_s"], p["tokens_seen"]
        self._epoch_loss_sum, self._epoch_windows = p["epoch_loss_sum"], p["epoch_windows"]
        self.train_cpu_time_s = p.get("train_cpu_time_s", 0.0)  # absent in checkpoints before it was measured
        self.state = _state_to(ckpt["state"], self.cfg.device)
        self.history = [EpochResult(**r) for r in ckpt["history"]]
        self.best_state_dict = ckpt["best_state_dict"]
        self.setting_changes = list(ckpt["setting_changes"])
        set_rng_states(ckpt["rng"])

    def save_checkpoint(self, path: str | Path) -> Path:
        """Atomic write: a run killed while saving never leaves a half-written checkpoint."""
        return save_checkpoint_file(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> dict[str, list[Any]]:
        """Resume from ``path``; returns the stopping rules this run changes ({key: [old, new]}, also
        recorded in ``setting_changes``). Loading runs no code from the file (``weights_only=True``); a
        file that is not a complete checkpoint of this trainer is a one-line CheckpointError naming it,
        and one written with other settings a SettingsMismatchError naming every key that differs."""
        ckpt = load_checkpoint_file(path)
        try:
            changes = self._changed_settings(ckpt, path)
            self.load_state_dict(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CheckpointError(f"checkpoint {path} is incomplete or not a trainer checkpoint "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if changes:
            self.setting_changes.append({"epoch": self.epoch, "global_step": self.global_step, "changes": changes})
        return changes

    def _changed_settings(self, ckpt: dict[str, Any], path: str | Path) -> dict[str, list[Any]]:
        """The stopping rules this run changes ({key: [old, new]}); SettingsMismatchError naming every
        other key that differs from the checkpoint's (training, model or data)."""
        saved, now = ckpt["train_config"], asdict(self.cfg)
        refused: list[str] = []
        allowed: dict[str, list[Any]] = {}
        for key in sorted(set(saved) | set(now)):
            old, new = saved.get(key, "<unset>"), now.get(key, "<unset>")
            if old == new or key in NOT_COMPARED:
                continue
            if key not in STOPPING_RULES:
                refused.append(f"{key} {old} -> {new}")
            elif key == "epochs" and self.cfg.lr_schedule == "cosine":
                refused.append(f"epochs {old} -> {new} (the cosine schedule is laid out over the epochs)")
            elif key == "epochs" and new < ckpt["progress"]["epoch"]:
                refused.append(f"epochs {old} -> {new} ({ckpt['progress']['epoch']} already completed)")
            else:
                allowed[key] = [old, new]
        saved_model, now_model = ckpt["model_config"] or {}, _model_config(self.model) or {}
        for key in sorted(set(saved_model) | set(now_model)):
            if saved_model.get(key, "<unset>") != now_model.get(key, "<unset>"):
                refused.append(f"{key} {saved_model.get(key, '<unset>')} -> {now_model.get(key, '<unset>')}")
        if "stream_position" not in ckpt["progress"] and self.steps_per_epoch < len(self.train_batches):
            refused.append("shortened epochs restarting the stream (older code) -> continuing it")
        old_data, new_data = ckpt["data_fingerprint"], getattr(self.data, "fingerprint", None)
        if old_data is not None and new_data is not None and old_data != new_data:
            refused.append(f"data fingerprint {old_data[:12]} -> {new_data[:12]}")
        if refused:
            raise SettingsMismatchError(f"checkpoint {path} was written with other settings: {', '.join(refused)}")
        return allowed


def _model_config(model: nn.Module) -> dict[str, Any] | None:
    """The model's dataclass config (``CharLM.cfg``), to refuse resuming into another architecture."""
    cfg = getattr(model, "cfg", None)
    return asdict(cfg) if is_dataclass(cfg) and not isinstance(cfg, type) else None


@torch.no_grad()
def bits_per_char(model: nn.Module, data: Tensor, batch_size: int, bptt: int, device: str = "cpu") -> float:
    """Mean cross-entropy in bits over every predicted symbol of ``data``."""
    was_training = model.training
    model.eval()
    batches = StreamBatches(data, batch_size, bptt, pad=True)
    total, state = 0.0, None
    for x, y in batches:
        logits, state = model(x.to(device), state)
        total += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
    model.train(was_training)
    return total / max(batches.num_tokens, 1) / LN2


class PeriodicCheckpoint:
    """Save a resumable checkpoint every ``every_steps`` steps and at each epoch's end."""

    def __init__(self, path: str | Path, every_steps: int = 0) -> None:
        self.path, self.every_steps = Path(path), every_steps

    def on_step_end(self, trainer: Trainer, step: int, loss_bpc: float) -> None:
        if self.every_steps and step % self.every_steps == 0:
            trainer.save_checkpoint(self.path)

    def on_epoch_end(self, trainer: Trainer, result: EpochResult) -> None:
        trainer.save_checkpoint(self.path)
