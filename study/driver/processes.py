"""The processes of a study's private Ray, recorded so that a killed driver's leftovers can be
stopped later, and nothing else.

A driver killed with SIGKILL leaves some of its private Ray's agents running. Matching processes
by command line or process group would also hit other studies started from the same shell or
``make``; here the driver records the exact processes it started (pid and kernel start time, so
a recycled pid is never mistaken for one of them) and the next driver of the study stops only
those, once the recorded driver is provably gone.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which is in parentheses and may hold spaces)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live process below ``root``."""
    if not PROC.is_dir():
        return []
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    out, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        start = process_start_time(pid)
        if start is not None:
            out.append((pid, start))
        stack.extend(children.get(pid, []))
    return out


class DriverRecord:
    """``driver.json`` in the study folder: this driver and the processes it started."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self) -> None:
        pid = os.getpid()
        record: dict[str, Any] = {"pid": pid, "start": process_start_time(pid),
                                  "children": [list(p) for p in descendants(pid)]}
        self.path.write_text(json.dumps(record))

    def children(self) -> list[tuple[int, int]]:
        """The processes this driver started so far (its private Ray), as (pid, start time)."""
        return descendants(os.getpid())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def stop_leftovers(self) -> int:
        """Kill the recorded processes of a previous driver that is gone; returns how many."""
        try:
            record = json.loads(self.path.read_text())
            pid, start = int(record["pid"]), record["start"]
            children = [(int(p), s) for p, s in record.get("children", [])]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        if pid != os.getpid() and process_start_time(pid) == start and start is not None:
            return 0  # that driver is alive: the store's lease decides, not this file
        return stop_processes(children)


def stop_processes(processes: list[tuple[int, int]]) -> int:
    """SIGKILL each (pid, start time) that is still that very process (not a reused pid); returns how many."""
    killed = 0
    for pid, start in processes:
        if pid != os.getpid() and start is not None and process_start_time(int(pid)) == start:
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed
