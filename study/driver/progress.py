"""One live progress line for the phase running now, instead of Ray's tables (``--verbose`` brings those back)::

    [search] 5/12 done (2 pruned, 1 failed) | 2 running | 5 pending | best 1.734 bpc nlstm-d2-search-003 | 1:42

On a terminal the line is rewritten in place, and a failed trial gets a line of its own with its
reason. In a log file (CI, ``nohup``) each trial's end is one line, and the summary line is
written every ``summary_every_s`` seconds and at the end: a few dozen lines for a small study,
not one per change.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ray import tune

from study.record.layout import trial_key_of
from study.record.tune_callback import error_summary


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressLine(tune.Callback):
    """The progress of a study's one Tuner, for the phase running now (a trial's phase is in its config).

    ``totals(phase)`` gives the phase's (trials in all, trials that had ended before this driver);
    ``stopped`` holds the trials a scheduler stopped (``study.search.scheduler``). Tune marks the trials
    it stops on Ctrl+C or SIGTERM TERMINATED, as it marks pruned ones: only those in ``stopped`` are
    called pruned, the others interrupted.
    """

    def __init__(self, totals: Callable[[str], tuple[int, int]], stopped: set[str] | None = None,
                 stream: TextIO | None = None, summary_every_s: float = 60.0,
                 recorded_best: Callable[[str], tuple[float, str] | None] | None = None) -> None:
        self.totals, self.stopped, self.summary_every_s = totals, stopped if stopped is not None else set(), \
            summary_every_s
        self.recorded_best = recorded_best or (lambda phase: None)  # the phase's best before this driver
        self._stream = stream
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._last_summary = self._start
        self.phase = ""
        self._trials: list[Any] = []  # Tune's trials as last seen (for the end of a phase)

    def __getstate__(self) -> dict[str, Any]:  # Tune snapshots its callbacks (never read back)
        return {"phase": self.phase}

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def setup(self, **info: Any) -> None:
        self._start = time.monotonic()

    def _how(self, trial: Any, ended: bool = False) -> str:
        """How a trial stands; ``ended``: Tune is telling that it completed (its status may still say RUNNING)."""
        result = trial.last_result or {}
        if trial.status == "ERROR":
            return "failed"
        if trial.status != "TERMINATED" and not ended:
            return trial.status.lower()
        if result.get("finished"):
            return "completed"
        return "pruned" if trial.trial_id in self.stopped else "interrupted"

    def text(self, trials: list[Any]) -> str:
        phase = self.phase
        counts = {"completed": 0, "pruned": 0, "interrupted": 0, "failed": 0, "running": 0}
        best, best_label = self.recorded_best(phase) or (math.inf, "")
        for t in trials:
            if (t.config or {}).get("phase", phase) != phase:
                continue
            how = self._how(t)
            if how in counts:
                counts[how] += 1
            result = t.last_result or {}
            value = result.get("best_valid_bpc")
            if isinstance(value, (int, float)) and value < best:
                best, best_label = value, f"{result.get('trial_key', t.trial_id)}"
        total, before = self.totals(phase)
        ended = counts["completed"] + counts["pruned"] + counts["interrupted"] + counts["failed"]
        done = before + ended
        pending = max(total - done - counts["running"], 0)
        notes = ", ".join(f"{counts[w]} {w}" for w in ("pruned", "interrupted", "failed") if counts[w])
        parts = [f"[{phase}] {done}/{total} done" + (f" ({notes})" if notes else ""),
                 f"{counts['running']} running", f"{pending} pending"]
        if math.isfinite(best):
            parts.append(f"best {best:.3f} bpc {best_label}")
        parts.append(_clock(time.monotonic() - self._start))
        return " | ".join(parts)

    def draw(self, trials: list[Any], force: bool = False) -> None:
        self._trials = trials
        if not self.phase:
            return
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

    def end_phase(self, phase: str) -> None:
        """The phase's last line (before its summary table)."""
        if self.phase == phase:
            text = self.text(self._trials)
            self.stream.write(("\r" + text + "\x1b[K\n") if self.stream.isatty() else text + "\n")
            self.stream.flush()

    def ended(self, trial: Any) -> None:
        """A log's line for a trial that ended (a terminal shows it in the live line instead)."""
        if self.stream.isatty():
            return
        result = trial.last_result or {}
        key = result.get("trial_key") or trial_key_of(trial.config) or trial.trial_id
        state = self._how(trial, ended=True)
        how = {"completed": "completed", "pruned": "stopped early (pruned)",
               "interrupted": "stopped (interrupted)"}.get(state, state)
        epochs = f" after {result['epoch']} epoch(s)" if result.get("epoch") else ""
        value = result.get("best_valid_bpc")
        best = f", best {value:.3f} bpc" if isinstance(value, (int, float)) and math.isfinite(value) else ""
        self.say(f"  [{(trial.config or {}).get('phase', self.phase)}] {key} {how}{epochs}{best}")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.draw(trials)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.phase = (trial.config or {}).get("phase", self.phase)
        self.draw(trials, force=True)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended(trial)
        self.draw(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = (trial.last_result or {}).get("trial_key") or trial_key_of(trial.config) or trial.trial_id
        self.say(f"  {key} failed: {error_summary(trial)}")
        self.draw(trials, force=True)
