"""One live progress line per phase, instead of Ray's tables (``--verbose`` brings those back)::

    [search] 5/12 done (2 pruned, 1 failed) | 2 running | 5 pending | best 1.734 bpc search-0003 nlstm-d2 | 1:42

On a terminal the line is rewritten in place, and a failed trial gets a line of its own with its
reason. In a log file (CI, ``nohup``) each trial's end is one line, and the summary line is
written every ``summary_every_s`` seconds and at the end: a few dozen lines for a small study,
not one per change.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from ray import tune

from study.layout import trial_key_of
from study.tracking_callback import error_summary


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine(tune.Callback):
    """``can_prune``: the phase has a scheduler that stops trials early. Tune marks a trial it stopped
    TERMINATED, pruned or interrupted (Ctrl+C, SIGTERM) alike; in a phase that cannot prune, such a
    trial was interrupted, and the line says so rather than "pruned"."""

    def __init__(self, phase: str, total: int, stream: TextIO | None = None, summary_every_s: float = 60.0,
                 can_prune: bool = True) -> None:
        self.phase, self.total, self.summary_every_s, self.can_prune = phase, total, summary_every_s, can_prune
        self._stream = stream
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_summary = self._start

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment
        return {"phase": self.phase, "total": self.total, "summary_every_s": self.summary_every_s,
                "can_prune": self._can_prune, "_stream": None,
                "_start": 0.0, "_last_draw": 0.0, "_last_summary": 0.0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start = self._last_summary = time.monotonic()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def setup(self, **info: Any) -> None:
        self._start = time.monotonic()

    def text(self, trials: list[Any]) -> str:
        done = stopped = failed = running = 0
        best, best_label = math.inf, ""
        for t in trials:
            result = t.last_result or {}
            if t.status == "TERMINATED":
                done += 1
                stopped += not result.get("finished", False)
            elif t.status == "ERROR":
                done += 1
                failed += 1
            elif t.status == "RUNNING":
                running += 1
            value = result.get("best_valid_bpc")
            if isinstance(value, (int, float)) and value < best:
                best, best_label = value, f"{result.get('trial_key', t.trial_id)} {result.get('family', '')}".strip()
        total = max(self.total, len(trials))
        pending = max(total - done - running, 0)
        notes = ", ".join(f"{n} {w}" for n, w in ((stopped, self._stopped_word), (failed, "failed")) if n)
        parts = [f"[{self.phase}] {done}/{total} done" + (f" ({notes})" if notes else ""),
                 f"{running} running", f"{pending} pending"]
        if math.isfinite(best):
            parts.append(f"best {best:.3f} bpc {best_label}")
        parts.append(_clock(time.monotonic() - self._start))
        return " | ".join(parts)

    @property
    def _can_prune(self) -> bool:
        return getattr(self, "can_prune", True)  # a callback pickled before can_prune existed

    @property
    def _stopped_word(self) -> str:
        return "pruned" if self._can_prune else "interrupted"

    def draw(self, trials: list[Any], force: bool = False) -> None:
        now = time.monotonic()
        if self.stream.isatty():
            if force or now - self._last_draw >= 0.5:
                self.stream.write("\r" + self.text(trials) + "\x1b[K")
                self.stream.flush()
                self._last_draw = now
        elif now - self._last_summary >= self.summary_every_s:
            self.say(self.text(trials))
            self._last_summary = now

    def say(self, line: str) -> None:
        if self.stream.isatty():
            self.stream.write("\r\x1b[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def ended(self, trial: Any, how: str) -> None:
        """A log's line for a trial that ended (a terminal shows it in the live line instead)."""
        if self.stream.isatty():
            return
        result = trial.last_result or {}
        key = result.get("trial_key") or trial_key_of(trial.config) or trial.trial_id
        family = f" {result['family']}" if result.get("family") else ""
        epochs = f" after {result['epoch']} epoch(s)" if result.get("epoch") else ""
        value = result.get("best_valid_bpc")
        best = f", best {value:.3f} bpc" if isinstance(value, (int, float)) and math.isfinite(value) else ""
        self.say(f"  [{self.phase}] {key}{family} {how}{epochs}{best}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.draw(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.draw(trials, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended(trial, "completed" if (trial.last_result or {}).get("finished") else
                   "stopped early (pruned)" if self._can_prune else "stopped (interrupted)")
        self.draw(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = (trial.last_result or {}).get("trial_key") or trial_key_of(trial.config) or trial.trial_id
        self.say(f"  {key} failed: {error_summary(trial)}")
        self.draw(trials, force=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        text = self.text(trials)
        self.stream.write(("\r" + text + "\x1b[K\n") if self.stream.isatty() else text + "\n")
        self.stream.flush()
