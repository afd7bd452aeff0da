"""One builder at a time per build folder, and no waiting on a builder that is gone.

torch's ``cpp_extension`` marks a build with a ``lock`` file (created exclusively, deleted when the
build ends); every other process polls until that file disappears, silently and with no limit. A
builder killed mid-build (a trial stopped by its scheduler, a node lost) leaves the file behind,
and every later process sat waiting (issue 20: > 150 s on one machine, > 8 minutes of trials
"running" with no epoch on two nodes sharing one cache).

So the build runs under :class:`BuildLock`, an ``flock`` on ``<folder>/build.lock``: the kernel
releases it when its holder exits, however it was killed (on NFS the server does). The holder
writes who it is (pid, host, start time) into the file and empties it when it is done, so:

- a process that finds the lock held says on stderr, in one line, who holds it and for how long,
  then waits for it (never silently);
- a process that gets the lock and finds a holder's record in it knows that holder ended without
  finishing (killed): it says so in one line and the caller removes torch's ``lock`` at once.

Where the file system refuses locks (or there is no ``fcntl``), the lock says so in one line and
holds nothing (``locked`` False); the caller then falls back to the age rule for torch's file.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "BuildLock", "Holder"]

LOCK_NAME = "build.lock"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a build lock."""

    pid: int
    host: str
    started: float  # time.time() when it took the lock

    @classmethod
    def me(cls) -> Holder:
        return cls(os.getpid(), socket.gethostname(), time.time())

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The record in a lock file; None if it is empty (released) or unreadable (being written)."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {max(0.0, time.time() - self.started):.0f} s ago"


class BuildLock:
    """Context manager: hold ``<folder>/build.lock`` while building into ``folder``.

    After entering, ``locked`` says whether the lock is really held and ``previous`` is the holder
    that ended without releasing it (None if the last one finished or there was none)."""

    def __init__(self, folder: Path, what: str = "the build", say: Callable[[str], None] = _stderr) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what, self.say = what, say
        self.fd: int | None = None
        self.locked = False
        self.previous: Holder | None = None

    def _record(self) -> Holder | None:
        return Holder.parse(os.pread(self.fd, 4096, 0).decode(errors="replace")) if self.fd is not None else None

    def __enter__(self) -> BuildLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError("no fcntl on this platform")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._record()
                who = holder.describe() if holder else "another process"
                self.say(f"nlstm: waiting for {self.what} in {self.path.parent} ({who}; it holds {self.path})")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: hold nothing, say so once
            os.close(self.fd)
            self.fd = None
            self.say(f"nlstm: cannot lock {self.path} ({getattr(e, 'strerror', None) or e}); "
                     f"{self.what} runs without it")
            return self
        self.locked = True
        self.previous = self._record()
        if self.previous is not None:
            self.say(f"nlstm: {self.what} in {self.path.parent} by {self.previous.describe()} ended without "
                     "finishing (killed?); taking it over")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(asdict(Holder.me())).encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty record: released, not abandoned
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
            self.locked = False
