"""Scratch directories for tests, benchmarks and the demo, and reaping the ones
a killed run left behind.

A run that is SIGKILLed (a CI job cancelled, a session that ends) cannot clean
up: its mounts, loop devices and directories stay, and they break the next run
on the same machine. So each scratch directory, ``/tmp/elv-<kind>-XXXXXXXX``,
holds an owner file naming the process that made it, by pid and by that
process's start time (a reused pid is not the owner). ``reap`` removes every
scratch directory whose owner is gone and never touches one whose owner lives.

This is tooling for our own tests, never the driver's data path: it only looks
under ``/tmp`` at directories it made.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from csi.host import loop as loopdev
from csi.host.mountinfo import MountTable

OWNER = ".elv-owner"
ROOT = "/tmp"
PREFIX = "elv-"
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid} {_start_time(pid)}"


def make(kind: str, root: str = ROOT) -> str:
    """A new scratch directory owned by this process (short: unix socket paths are limited to 107 bytes)."""
    base = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=root)
    with open(os.path.join(base, OWNER), "w") as f:
        f.write(owner_token() + "\n")
    return base


def owner_alive(base: str) -> bool:
    """Whether the process that made ``base`` still runs (False without an owner file)."""
    try:
        with open(os.path.join(base, OWNER)) as f:
            pid_s, _, start = f.read().strip().partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return False
    return _start_time(pid) == start


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=False, capture_output=True, env=_ENV, timeout=60)


def cleanup(base: str) -> None:
    """Best-effort removal of every loop device and mount under ``base``.

    Loop devices are detached first (a busy one is marked to detach on last
    close), then mounts are lazily unmounted deepest first; a pool that is
    itself a mounted filesystem goes last, once nothing holds it.
    """
    real = os.path.realpath(base)

    def detach() -> None:
        for d in loopdev.scan():
            if d.backing_file.startswith(real + "/"):
                _run(["losetup", "-d", d.path])

    detach()
    for _ in range(20):
        mounts = MountTable.load().under(real)
        if not mounts:
            break
        for m in sorted(mounts, key=lambda m: -len(m.mount_point)):
            _run(["umount", "-l", m.mount_point])
    detach()


def remove(base: str) -> bool:
    """Clean ``base`` up and delete it; False if something is still mounted there."""
    cleanup(base)
    if MountTable.load().under(os.path.realpath(base)):
        return False
    shutil.rmtree(base, ignore_errors=True)
    return not os.path.lexists(base)


def stale(root: str = ROOT) -> list[str]:
    """Scratch directories under ``root`` whose owner is gone."""
    out = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not name.startswith(PREFIX) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if os.path.isfile(os.path.join(path, OWNER)) and not owner_alive(path):
            out.append(path)
    return out


def reap(root: str = ROOT) -> tuple[list[str], list[str]]:
    """Remove every stale scratch directory: (removed, could not be removed)."""
    removed: list[str] = []
    failed: list[str] = []
    for path in stale(root):
        (removed if remove(path) else failed).append(path)
    return removed, failed
