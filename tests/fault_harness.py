"""Faults on demand for tests: a small disk that fills up.

``SmallDisk(folder, size_mb)`` mounts a tmpfs of ``size_mb`` MiB at ``folder`` inside a private
mount namespace (``unshare -m``; nothing outside it sees the mount) held open by a sleeping
process. Commands run inside that namespace (``disk.run`` / ``disk.popen``, through ``nsenter``)
see the small disk at ``folder`` and the rest of the machine as usual; the test itself reaches the
disk through ``/proc/<holder>/root`` (``disk.view``) to fill it or free it, before a command or
while it runs::

    from fault_harness import small_disk  # the fixture; skips with one reason where not permitted

    def test_x(small_disk, tmp_path):
        disk = small_disk(tmp_path / "store", size_mb=8)
        disk.fill()                                   # ENOSPC for the next write in there
        out = disk.run([sys.executable, "-c", "..."])
        disk.free()                                   # room again

Needs root (or a user namespace allowing mounts), ``unshare`` and ``nsenter`` (util-linux); the
probe says which is missing. Everything started here is stopped by PID in ``close``.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

FILLER_PREFIX = ".fault-fill-"
PAGE = 4096


@functools.cache
def namespace_problem() -> str | None:
    """None if a tmpfs can be mounted in a private mount namespace here, else why not (one line)."""
    missing = [tool for tool in ("unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux)"
    with tempfile.TemporaryDirectory(prefix="fault-probe-") as folder:
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                'mount -t tmpfs -o size=1m fault-probe "$1" && umount "$1"', "sh", folder],
                               capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip() or probe.returncode}"
    return None


class SmallDisk:
    """A tmpfs of ``size_mb`` MiB at ``folder``, seen only by commands run through this object."""

    def __init__(self, folder: Path, size_mb: int) -> None:
        self.folder, self.size_mb = Path(folder).resolve(), size_mb
        self.folder.mkdir(parents=True, exist_ok=True)  # the mount point, on the real disk
        script = 'mount -t tmpfs -o "size=$1m" fault-disk "$2" && echo ready && exec sleep infinity'
        # unshare without --fork execs the shell, then sleep, in its own process: that PID is in the namespace
        self.holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                                        str(size_mb), str(self.folder)], stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True, start_new_session=True)
        ready = self.holder.stdout.readline().strip()
        if ready != "ready":
            error = self.holder.stderr.read().strip()
            self.close()
            raise RuntimeError(f"could not mount the small disk at {self.folder}: {error}")
        self._fills = 0

    @property
    def view(self) -> Path:
        """The small disk as this (outside) process reaches it."""
        return Path(f"/proc/{self.holder.pid}/root") / self.folder.relative_to("/")

    def command(self, command: list[str], cwd: Path | str | None = None) -> list[str]:
        """``command`` wrapped to run inside the namespace, in ``cwd`` (default: this process's)."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", f"--wd={cwd or os.getcwd()}", "--", *command]

    def run(self, command: list[str], cwd: Path | str | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 300)
        return subprocess.run(self.command(command, cwd), **kwargs)

    def popen(self, command: list[str], cwd: Path | str | None = None, **kwargs: Any) -> subprocess.Popen:
        """Started in its own session: stop it (and what it started) with ``os.killpg(p.pid, ...)``."""
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(command, cwd), **kwargs)

    def free_bytes(self) -> int:
        stat = os.statvfs(self.view)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave_bytes: int = 0) -> int:
        """Take the disk's free space (but ``leave_bytes``) with a filler file; returns the bytes taken."""
        self._fills += 1
        path = self.view / f"{FILLER_PREFIX}{self._fills}"
        taken = 0
        with open(path, "wb", buffering=0) as f:
            want = self.free_bytes() - leave_bytes
            if want > 0:
                try:
                    os.posix_fallocate(f.fileno(), 0, want)
                    taken = want
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
            f.seek(0, os.SEEK_END)
            while leave_bytes == 0:  # to the last page: metadata and rounding leave a few
                try:
                    taken += f.write(b"\0" * PAGE)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
        return taken

    def free(self) -> None:
        """Remove every filler file."""
        for path in self.view.glob(f"{FILLER_PREFIX}*"):
            path.unlink()

    def close(self) -> None:
        """Stop the holder (by PID); the namespace and its tmpfs go with the last process in it."""
        if self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
        self.holder.wait(timeout=30)
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def small_disk() -> Iterator[Callable[..., SmallDisk]]:
    """``small_disk(folder, size_mb=8)``: a SmallDisk, closed after the test; the test is skipped
    (with the reason) where mount namespaces are not permitted."""
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    disks: list[SmallDisk] = []

    def make(folder: Path, size_mb: int = 8) -> SmallDisk:
        disks.append(SmallDisk(folder, size_mb))
        return disks[-1]

    yield make
    for disk in disks:
        disk.close()
