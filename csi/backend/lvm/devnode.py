"""Block device nodes for active LVs, found by major:minor, with or without udev.

The kernel names every device-mapper disk ``dm-<minor>``, and devtmpfs makes
``/dev/dm-N`` the moment the disk is added, so that node (not the
``/dev/<vg>/<lv>`` symlink, which needs udev rules) is the one ELV mounts and
binds. Where /dev is not devtmpfs (some containers) nothing makes the node,
and ELV makes it itself. Either way the wait is a bounded poll with growing
intervals, never a fixed sleep (puppetlabs-lvm #380: mkfs raced udev).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time

from csi.errors import Internal
from csi.model import Device

SYS_DEV_BLOCK = "/sys/dev/block"
DEV = "/dev"


def kernel_name(major: int, minor: int, sys_dev_block: str = SYS_DEV_BLOCK) -> str | None:
    """``dm-3`` for 254:3, read from sysfs; None while the kernel has no such disk."""
    try:
        return os.path.basename(os.readlink(os.path.join(sys_dev_block, f"{major}:{minor}")))
    except FileNotFoundError:
        return None


def node_matches(path: str, major: int, minor: int) -> bool | None:
    """True if ``path`` is the block node major:minor, False if it is something
    else, None if it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == major and os.minor(st.st_rdev) == minor


def make_node(path: str, major: int, minor: int) -> None:
    with contextlib.suppress(FileExistsError):
        os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(major, minor))


async def wait_for_device(
    major: int,
    minor: int,
    *,
    timeout: float = 10.0,
    make_nodes: bool = False,
    sys_dev_block: str = SYS_DEV_BLOCK,
    dev: str = DEV,
) -> Device:
    """Wait (bounded) until the device major:minor has its node; make it if allowed."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        name = kernel_name(major, minor, sys_dev_block)
        if name is not None:
            path = os.path.join(dev, name)
            ok = node_matches(path, major, minor)
            if ok:
                return Device(name=name, path=path, major=major, minor=minor)
            if ok is None and make_nodes:
                make_node(path, major, minor)
                continue
        if time.monotonic() >= deadline:
            what = f"/dev/{name}" if name else f"the kernel device {major}:{minor}"
            raise Internal(f"{what} did not appear within {timeout:g}s of activating the LV")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


def scan_dm_by_name(dm_name: str, sys_block: str = "/sys/block") -> tuple[tuple[str, int, int] | None, bool]:
    """(kernel name, major, minor) of the device-mapper device called ``dm_name``,
    and whether the scan was complete.

    A device being removed while it is read makes sysfs answer EINVAL or
    ENXIO (seen in the guest while another VG's LVs were deactivated). Such
    an entry is skipped, and the scan reports itself incomplete: "not found"
    then is not proof, and a caller that acts on absence must ask LVM."""
    try:
        entries = os.listdir(sys_block)
    except FileNotFoundError:
        return None, True
    complete = True
    for entry in entries:
        if not entry.startswith("dm-"):
            continue
        try:
            with open(os.path.join(sys_block, entry, "dm", "name"), encoding="utf-8") as f:
                if f.read().strip() != dm_name:
                    continue
            with open(os.path.join(sys_block, entry, "dev"), encoding="ascii") as f:
                major, minor = f.read().strip().split(":")
        except FileNotFoundError:
            continue  # gone between listdir and open: it was not active for us either
        except (OSError, ValueError):
            complete = False
            continue
        return (entry, int(major), int(minor)), True
    return None, complete


def find_dm_by_name(dm_name: str, sys_block: str = "/sys/block") -> tuple[str, int, int] | None:
    """(kernel name, major, minor) of the device-mapper device called ``dm_name``
    (e.g. the ``-cow`` store of a snapshot, which LVM does not report)."""
    return scan_dm_by_name(dm_name, sys_block)[0]


def dm_name(vg: str, lv: str, layer: str | None = None) -> str:
    """The device-mapper name LVM gives ``vg/lv`` (dashes doubled, as dm does)."""
    parts = [vg.replace("-", "--"), lv.replace("-", "--")]
    if layer:
        parts.append(layer)
    return "-".join(parts)
