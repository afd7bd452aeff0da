"""How much memory this process and the trials it starts may use: the machine's RAM, this process's
resource limits (``ulimit -v`` / RLIMIT_AS, ``ulimit -d`` / RLIMIT_DATA) and the memory limit of its
cgroup (v2 ``memory.max``, or v1 ``memory.limit_in_bytes``).

Why: the budget check compared a model against the machine's RAM alone, so a study under a 6 GB
address-space limit or in a container with a memory limit passed it and then died with a
MemoryError traceback in the middle of ``--dry-run`` or of a trial. A local study's trials are
children of this process (its private Ray), so they inherit its resource limits and share its
cgroup.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
UNLIMITED_CGROUP = 2**62  # v1 reports "no limit" as a huge number (9223372036854771712)


@dataclass(frozen=True)
class Room:
    """``bytes`` that can still be used under one limit, and what the limit is (for messages).
    ``shared``: the limit holds for all the trials together (RAM, a cgroup), not per process."""

    bytes: int
    what: str
    shared: bool


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmSize, VmData) in bytes; 0 if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rlimit_rooms() -> list[Room]:
    """What this process may still allocate under its soft RLIMIT_AS and RLIMIT_DATA (a child
    process inherits the same limit, and starts with about as much in use: Python and torch)."""
    rooms = []
    for which, name, used_key in ((resource.RLIMIT_AS, "address-space limit (ulimit -v)", "VmSize"),
                                  (resource.RLIMIT_DATA, "data-segment limit (ulimit -d)", "VmData")):
        soft, _ = resource.getrlimit(which)
        if soft == resource.RLIM_INFINITY:
            continue
        used = _status_bytes(used_key)
        rooms.append(Room(max(soft - used, 0), f"this process's {name} of {_size(soft)}, less the {_size(used)} "
                          "it already uses", shared=False))
    return rooms


def _cgroup_dirs() -> list[tuple[Path, str]]:
    """(folder, version) of this process's memory cgroup and of each ancestor inside the mount,
    innermost first; empty where /proc or the cgroup file system is not readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    groups: dict[str, str] = {}  # "v2" or "v1" -> the cgroup's path
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and controllers == "":
            groups.setdefault("v2", path)
        elif "memory" in controllers.split(","):
            groups["v1"] = path
    found: list[tuple[Path, str]] = []
    for line in mounts:
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        root, mount_point = fields[3], fields[4]
        after = line.split(" - ", 1)[1].split()
        fstype, options = after[0], after[2] if len(after) > 2 else ""
        version = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "memory" in options.split(",") else ""
        path = groups.get(version) if version else None
        if path is None or not (path == root or path.startswith(root.rstrip("/") + "/")):
            continue
        folder = Path(mount_point) / path[len(root.rstrip("/")):].lstrip("/")
        while True:
            found.append((folder, version))
            if folder == Path(mount_point):
                break
            folder = folder.parent
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def cgroup_room() -> Room | None:
    """What this process's cgroup (or the tightest of its ancestors) still has below its memory
    limit, shared by every process in it; None where there is no limit or it cannot be read."""
    best: Room | None = None
    for folder, version in _cgroup_dirs():
        limit_file, usage_file = (("memory.max", "memory.current") if version == "v2"
                                  else ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        limit = _read_int(folder / limit_file)
        if limit is None or limit >= UNLIMITED_CGROUP:
            continue
        used = _read_int(folder / usage_file) or 0
        room = Room(max(limit - used, 0), f"the memory limit of this process's cgroup ({folder / limit_file}: "
                    f"{_size(limit)}, {_size(used)} in use)", shared=True)
        if best is None or room.bytes < best.bytes:
            best = room
    return best


def trial_room(concurrency: int, limits: bool = True) -> Room:
    """The memory one of ``concurrency`` trials running at once on this machine may use: the
    tightest of the machine's RAM and the cgroup's room (each shared by the trials) and this
    process's resource limits (which each trial's process inherits whole). ``limits=False``: the
    machine's RAM only (trials on other machines, which have their own limits)."""
    concurrency = max(1, concurrency)
    shared_by = f", shared by {concurrency} trials at a time" if concurrency > 1 else ""
    ram = physical_memory()
    rooms = [Room(ram // concurrency, f"this machine's memory of {_size(ram)}{shared_by}", shared=True)]
    if limits:
        cgroup = cgroup_room()
        if cgroup is not None:
            rooms.append(Room(cgroup.bytes // concurrency, cgroup.what + shared_by, shared=True))
        rooms += rlimit_rooms()
    return min(rooms, key=lambda r: r.bytes)
