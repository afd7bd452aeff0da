"""tests/fault_harness.py works: a command in the namespace writes to the small disk, fails with
ENOSPC once the test filled it, and succeeds again once the test freed it; the mount is private."""

from __future__ import annotations

import errno
import subprocess
import sys

from fault_harness import small_disk  # noqa: F401 (the fixture)

WRITE = ("import errno, sys\n"
         "try:\n"
         "    with open(sys.argv[1], 'wb') as f:\n"
         "        f.write(b'x' * 200_000)\n"
         "except OSError as e:\n"
         "    print(errno.errorcode[e.errno]); sys.exit(1)\n"
         "print('written')\n")


def test_a_write_fails_with_enospc_on_the_filled_disk_and_succeeds_once_freed(small_disk, tmp_path):  # noqa: F811
    disk = small_disk(tmp_path / "disk", size_mb=4)
    assert 3 * 2**20 < disk.free_bytes() <= 4 * 2**20  # the tmpfs, not the disk under the folder

    out = disk.run([sys.executable, "-c", WRITE, str(disk.folder / "a")])
    assert (out.returncode, out.stdout.strip()) == (0, "written"), out.stderr

    assert disk.fill() > 3 * 2**20 and disk.free_bytes() == 0
    out = disk.run([sys.executable, "-c", WRITE, str(disk.folder / "b")])
    assert (out.returncode, out.stdout.strip()) == (1, errno.errorcode[errno.ENOSPC]), out.stderr

    disk.free()
    out = disk.run([sys.executable, "-c", WRITE, str(disk.folder / "c")])
    assert (out.returncode, out.stdout.strip()) == (0, "written"), out.stderr
    assert sorted(p.name for p in disk.view.iterdir()) == ["a", "b", "c"]  # b: created, then no room to write
    assert list((tmp_path / "disk").iterdir()) == []  # outside the namespace: the empty mount point


def test_the_disk_can_fill_while_the_command_runs(small_disk, tmp_path):  # noqa: F811
    disk = small_disk(tmp_path / "disk", size_mb=4)
    script = ("import sys\n"
              "open(sys.argv[1] + '/first', 'wb').write(b'x' * 1000)\n"
              "print('first', flush=True)\n"
              "sys.stdin.readline()\n" + WRITE.replace("sys.argv[1]", "sys.argv[1] + '/second'"))
    process = disk.popen([sys.executable, "-c", script, str(disk.folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "first"
        disk.fill()  # between its two writes
        out, _ = process.communicate("go\n", timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert (process.returncode, out.strip()) == (1, "ENOSPC")
