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

from study.driver.processes import process_start_time, stop_processes
from study.record.layout import LEASE_TAG

DISK_FULL_ALARM = "no space left on the tracking store's device"


class LeaseHeld(RuntimeError):
    """Another live driver holds the study's lease."""


class LeaseLost(RuntimeError):
    """This driver no longer holds the study's lease (another took it over): it must write nothing more."""


def _lease_owner(client: MlflowClient, experiment_id: str) -> str | None:
    tag = client.get_experiment(experiment_id).tags.get(LEASE_TAG)
    try:
        lease = json.loads(tag) if tag else None
    except ValueError:
        return None
    return lease.get("owner") if isinstance(lease, dict) else None


class LeaseFence:
    """Fencing for a trial's writes: before a write, check that the driver the trial belongs to still
    holds the study's lease (read at most every ``every_s`` seconds); if another driver took the study
    over, raise ``Lost`` and write nothing. A paused driver's trials keep running on their workers; this
    is what stops them from recording over the new driver's work."""

    Lost = LeaseLost

    def __init__(self, tracking_uri: str, experiment_id: str, owner: str, every_s: float = 2.0) -> None:
        self.tracking_uri, self.experiment_id, self.owner, self.every_s = tracking_uri, experiment_id, owner, every_s
        self._client: MlflowClient | None = None
        self._checked = -float("inf")

    def __call__(self) -> None:
        if not self.owner or time.monotonic() - self._checked < self.every_s:
            return
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        holder = _lease_owner(self._client, self.experiment_id)
        if holder != self.owner:
            raise LeaseLost(f"the driver of this trial lost the study's lease (now held by {holder or 'nobody'}); "
                            "writing nothing more")
        self._checked = time.monotonic()


@dataclass
class StudyLease:
    client: MlflowClient
    experiment_id: str
    study: str
    heartbeat_s: float = 5.0
    stale_after_s: float = 30.0
    settle_s: float = 1.5
    unreachable_after: int = 3  # heartbeats in a row that could not reach the store: the driver stops
    on_lost: Callable[[str], None] | None = None  # called (from the heartbeat thread) if another driver took it
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    lost: bool = False  # set once another driver was seen holding the lease
    # (pid, start time) of the processes this driver started (its private Ray): a driver that takes over the
    # lease of a dead one on the same host stops them, from whatever folder it runs
    children: list[tuple[int, int]] = field(default_factory=list)
    leftovers_stopped: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def _me(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": platform.node(), "pid": os.getpid(),
                "pid_start": process_start_time(os.getpid()), "heartbeat": time.time(),
                "children": [list(c) for c in self.children]}

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
            dead = held.get("pid") is not None and process_start_time(int(held["pid"])) != held.get("pid_start")
            if held.get("host") == platform.node() and dead:  # a paused driver's trials are fenced, not killed
                try:
                    self.leftovers_stopped = stop_processes([(int(p), s) for p, s in held.get("children", [])])
                except (TypeError, ValueError):
                    self.leftovers_stopped = 0
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
        failures = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.read()
                if not held or held["owner"] != self.owner:  # taken over, or taken over and already released:
                    self.lost = True                         # never ours to write again
                    if self.on_lost:
                        who = f"({self.describe(held)})" if held else "(which has finished since)"
                        self.on_lost(f"another driver took over the lease of study {self.study!r} {who}")
                    return
                self._write()
                failures = 0
            except Exception as e:  # a store hiccup: try again at the next beat; staleness is judged by others
                failures += 1
                full = "database or disk is full" in str(e) or "No space left on device" in str(e)
                if (full or failures >= self.unreachable_after) and self.on_lost:
                    self.on_lost(DISK_FULL_ALARM if full else
                                 f"the tracking store is unreachable ({str(e).strip().splitlines()[0][:200]})")
                    return

    def check(self) -> None:
        """Fencing: raise ``LeaseLost`` unless this driver still holds the lease (before a write that ends a
        run, a trial or a phase)."""
        holder = _lease_owner(self.client, self.experiment_id)
        if holder != self.owner:
            self.lost = True
            raise LeaseLost(f"another driver took over study {self.study!r} while this one was stopped or "
                            "unreachable; this driver wrote nothing more and stops")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self.lost:
            return  # the lease is another driver's now: not ours to delete
        try:
            held = self.read()
            if held and held["owner"] == self.owner:
                self.client.delete_experiment_tag(self.experiment_id, LEASE_TAG)
        except Exception:  # the store went away: the heartbeat goes stale and the lease frees itself
            pass
