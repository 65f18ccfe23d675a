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
from csi.host import procs
from csi.host.mountinfo import MountTable

OWNER = ".elv-owner"
ROOT = "/tmp"
PREFIX = "elv-"
_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def make(kind: str, root: str = ROOT) -> str:
    """A new scratch directory owned by this process (short: unix socket paths are limited to 107 bytes)."""
    base = tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=root)
    with open(os.path.join(base, OWNER), "w") as f:
        f.write(procs.token() + "\n")
    return base


def owner_alive(base: str) -> bool:
    """Whether the process that made ``base`` still runs (False without an owner file)."""
    try:
        with open(os.path.join(base, OWNER)) as f:
            return procs.alive(f.read())
    except OSError:
        return False


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=False, capture_output=True, env=_ENV, timeout=60)


def cleanup(base: str) -> None:
    """Best-effort removal of every loop device and mount under ``base``.

    Loop devices are detached first, the ones over them (read-only views)
    before them (a busy one is marked to detach on last close), then mounts
    are lazily unmounted deepest first; a pool that is itself a mounted
    filesystem goes last, once nothing holds it.
    """
    real = os.path.realpath(base)

    def detach() -> None:
        attached = loopdev.scan()
        ours = [d for d in attached if d.backing_file.startswith(real + "/")]
        # Loop devices over those (a read-only view, csi.node.views) hold them open: first.
        over = [d for d in attached if d.backing_file in {o.path for o in ours}]
        for d in over + ours:
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


def orphan_loops(root: str = ROOT, attached: list[loopdev.LoopDevice] | None = None) -> list[loopdev.LoopDevice]:
    """Loop devices a killed run left over files of a scratch directory that is
    gone (removed while the device stayed attached), and the devices stacked on
    them (read-only views), stacked ones first. A live owner still has its
    directory, so nothing of a running test is ever listed."""
    attached = loopdev.scan() if attached is None else attached
    prefix = os.path.join(os.path.realpath(root), PREFIX)
    ours = []
    for d in attached:
        if not d.backing_file.startswith(prefix):
            continue
        # The scratch directory (or file) right under root that holds the backing file.
        top = os.path.join(os.path.dirname(prefix), d.backing_file[len(os.path.dirname(prefix)) + 1 :].split("/")[0])
        if not os.path.lexists(top):
            ours.append(d)
    over = [d for d in attached if d.backing_file in {o.path for o in ours}]
    return over + ours


def reap(root: str = ROOT) -> tuple[list[str], list[str]]:
    """Remove every stale scratch directory: (removed, could not be removed)."""
    removed: list[str] = []
    failed: list[str] = []
    for path in stale(root):
        (removed if remove(path) else failed).append(path)
    for d in orphan_loops(root):
        _run(["losetup", "-d", d.path])
        removed.append(f"{d.path} (attached to {d.backing_file}, whose directory is gone)")
    return removed, failed
