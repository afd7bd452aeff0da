"""A study's lease, held in the MLflow store: one driver per study, whatever folder or machine.

A file in the study folder only stops a second driver that uses the same folder; two drivers of
one study against one store from two folders duplicated trial runs and logged epochs twice. The
lease is one JSON tag on the study's experiment (``nlstm.lease``: owner, host, pid, heartbeat),
refreshed by a background thread. A second driver is refused while the heartbeat is fresh; a
lease whose heartbeat is older than ``stale_after_s``, or whose driver is provably dead (same host,
no such process), is taken over.

MLflow has no compare-and-set, so taking the lease is write-then-verify: write our owner id, wait
``settle_s`` (longer than any competing driver's read-then-write gap, which is milliseconds),
read it back. Of two drivers racing, only the last writer reads its own id back. Heartbeats use
wall-clock time: hosts sharing a store need clocks within a few seconds of each other.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlflow import MlflowClient

from study.layout import LEASE_TAG
from study.processes import process_start_time


class LeaseHeld(RuntimeError):
    """Another live driver holds the study's lease."""


@dataclass
class StudyLease:
    client: MlflowClient
    experiment_id: str
    study: str
    heartbeat_s: float = 5.0
    stale_after_s: float = 30.0
    settle_s: float = 1.5
    on_lost: Callable[[str], None] | None = None  # called (from the heartbeat thread) if another driver took it
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _me(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": platform.node(), "pid": os.getpid(),
                "pid_start": process_start_time(os.getpid()), "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        tag = self.client.get_experiment(self.experiment_id).tags.get(LEASE_TAG)
        try:
            lease = json.loads(tag) if tag else None
        except ValueError:
            return None
        return lease if isinstance(lease, dict) and lease.get("owner") else None

    def _write(self) -> None:
        self.client.set_experiment_tag(self.experiment_id, LEASE_TAG, json.dumps(self._me()))

    def holder_is_alive(self, lease: dict[str, Any]) -> bool:
        """False when the holder's heartbeat is stale, or it ran on this host and its process is gone."""
        if time.time() - float(lease.get("heartbeat", 0)) > self.stale_after_s:
            return False
        if lease.get("host") == platform.node() and lease.get("pid") is not None:
            return process_start_time(int(lease["pid"])) == lease.get("pid_start")
        return True

    def describe(self, lease: dict[str, Any]) -> str:
        age = max(0.0, time.time() - float(lease.get("heartbeat", 0)))
        return f"driver pid {lease.get('pid')} on {lease.get('host')}, heartbeat {age:.0f} s ago"

    def acquire(self) -> str | None:
        """Take the lease or raise ``LeaseHeld``; returns a note when a stale lease was taken over."""
        held = self.read()
        note = None
        if held and held["owner"] != self.owner:
            if self.holder_is_alive(held):
                raise LeaseHeld(f"study {self.study!r} is already running ({self.describe(held)}); wait for it "
                                "to finish or stop that driver first")
            note = f"taking over the lease of a driver that is gone ({self.describe(held)})"
        self._write()
        time.sleep(self.settle_s)
        held = self.read()
        if not held or held["owner"] != self.owner:
            other = self.describe(held) if held else "unknown driver"
            raise LeaseHeld(f"study {self.study!r} was started by another driver at the same moment ({other})")
        self._thread = threading.Thread(target=self._beat, name="nlstm-lease", daemon=True)
        self._thread.start()
        return note

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.read()
                if held and held["owner"] != self.owner:
                    if self.on_lost:
                        self.on_lost(f"another driver took over the lease of study {self.study!r} "
                                     f"({self.describe(held)})")
                    return
                self._write()
            except Exception:  # a store hiccup: try again at the next beat; staleness is judged by others
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        try:
            held = self.read()
            if held and held["owner"] == self.owner:
                self.client.delete_experiment_tag(self.experiment_id, LEASE_TAG)
        except Exception:  # the store went away: the heartbeat goes stale and the lease frees itself
            pass
