"""Loop devices: find, attach, detach and resize.

Lookups read sysfs (``/sys/block/loopN/loop/backing_file``), which costs no
process and sees every device at once. Changes go through ``losetup`` from
util-linux: its ``--nooverlap`` attach is idempotent (a second attach of the
same file returns the existing device) and it already handles the race
between LOOP_CTL_GET_FREE and configuring the device.

A path in sysfs is the path *as seen through the mount the file was opened
by*. In a container that mount goes when the container does: after the node
plugin's pod is restarted, the kernel shows the files its predecessor
attached relative to the mount's root (``/loop/volumes/ID.img`` for
``/var/lib/elv/loop/volumes/ID.img``). Matching on the path alone then takes
an attached volume for a detached one: a stage would attach it a second time
(two devices, one filesystem) and an unstage would leave its device behind.
So a device whose path does not match is compared by the identity of its
file (device and inode, LOOP_GET_STATUS64), which no mount namespace changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from csi.errors import CommandError, FailedPrecondition, Internal
from csi.host import loopctl
from csi.host.runner import Runner

log = logging.getLogger(__name__)
SYS_BLOCK = "/sys/block"
_DELETED = " (deleted)"
_LOOP_NAME = re.compile(r"^loop[0-9]+$")


@dataclass(frozen=True)
class LoopDevice:
    name: str  # "loop3"
    backing_file: str  # as the kernel reports it, without the " (deleted)" suffix
    deleted: bool = False
    direct_io: bool | None = None

    @property
    def path(self) -> str:
        return "/dev/" + self.name


def parse_losetup_json(text: str) -> list[LoopDevice]:
    """Parse ``losetup --json --list`` (util-linux 2.3x)."""
    if not text.strip():
        return []  # losetup prints nothing when no device is attached
    data = json.loads(text)
    out: list[LoopDevice] = []
    for entry in data.get("loopdevices", []):
        name = os.path.basename(str(entry["name"]))
        back = str(entry.get("back-file") or "")
        deleted = back.endswith(_DELETED)
        if deleted:
            back = back[: -len(_DELETED)]
        dio = entry.get("dio")
        out.append(LoopDevice(name, back, deleted, bool(dio) if dio is not None else None))
    return out


def parse_backing_file(raw: str) -> tuple[str, bool]:
    """Split sysfs ``backing_file`` text into (path, deleted)."""
    path = raw.rstrip("\n")
    if path.endswith(_DELETED):
        return path[: -len(_DELETED)], True
    return path, False


PROC_PARTITIONS = "/proc/partitions"


def parse_partitions(text: str) -> list[str]:
    """Loop device names in /proc/partitions, which lists only devices with a
    capacity: for loop devices, the attached ones."""
    names = []
    for line in text.splitlines()[2:]:
        fields = line.split()
        if len(fields) == 4 and _LOOP_NAME.match(fields[3]):
            names.append(fields[3])
    return names


def _candidates(sys_block: str) -> list[str]:
    # A host keeps every loop device it ever created (hundreds on a busy node);
    # opening each one's sysfs file on every lookup cost 2 ms per scan with 258
    # of them. /proc/partitions names just the attached ones, in one read.
    if sys_block == SYS_BLOCK:
        try:
            with open(PROC_PARTITIONS, encoding="ascii") as f:
                return parse_partitions(f.read())
        except OSError:
            pass
    try:
        return os.listdir(sys_block)
    except FileNotFoundError:
        return []


def scan(sys_block: str = SYS_BLOCK) -> list[LoopDevice]:
    """Every attached loop device, from sysfs."""
    out: list[LoopDevice] = []
    for name in _candidates(sys_block):
        if not _LOOP_NAME.match(name):
            continue
        base = os.path.join(sys_block, name, "loop")
        try:
            with open(os.path.join(base, "backing_file"), encoding="utf-8", errors="surrogateescape") as f:
                path, deleted = parse_backing_file(f.read())
        except OSError:
            # Not attached (no loop/ dir), or being torn down while we looked:
            # the kernel then answers ENODEV or ENXIO for the read.
            continue
        dio: bool | None = None
        try:
            with open(os.path.join(base, "dio"), encoding="ascii") as f:
                dio = f.read().strip() == "1"
        except OSError:
            pass
        out.append(LoopDevice(name, path, deleted, dio))
    return sorted(out, key=lambda d: int(d.name[4:]))


#: (major, minor, inode) of a file.
Identity = tuple[int, int, int]


def file_identity(path: str) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def find(
    backing_file: str,
    sys_block: str = SYS_BLOCK,
    identity: Callable[[str], Identity | None] = loopctl.backing_identity,
) -> list[LoopDevice]:
    """Loop devices whose backing file is this file (not deleted): the same
    path, or, for one attached through another mount, the same file."""
    devices = [d for d in scan(sys_block) if not d.deleted]
    found = [d for d in devices if d.backing_file == backing_file]
    others = [d for d in devices if d.backing_file != backing_file and d.backing_file.endswith(_tail(backing_file))]
    if others:
        want = file_identity(backing_file)
        found += [d for d in others if want is not None and identity(d.name) == want]
    return sorted(found, key=lambda d: int(d.name[4:]))


def _tail(path: str) -> str:
    """What a path still ends with when the kernel shows it relative to a mount:
    its last component, with the slash before it."""
    return "/" + os.path.basename(path)


def size_bytes(name: str, sys_block: str = SYS_BLOCK) -> int:
    with open(os.path.join(sys_block, name, "size"), encoding="ascii") as f:
        return int(f.read().strip()) * 512


def read_only(name: str, sys_block: str = SYS_BLOCK) -> bool:
    """Whether the kernel refuses writes to the device (sysfs ``ro``)."""
    try:
        with open(os.path.join(sys_block, name, "ro"), encoding="ascii") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def logical_block_size(name: str, sys_block: str = SYS_BLOCK) -> int:
    with open(os.path.join(sys_block, name, "queue", "logical_block_size"), encoding="ascii") as f:
        return int(f.read().strip())


# -- discards: what may free blocks of a backing file ------------------------------------
#
# Measured on 6.18 (ext4 pool; 6.1 behaves the same): the loop driver turns
# REQ_OP_DISCARD into a hole punched in the backing file, and so it does
# REQ_OP_WRITE_ZEROES unless the request carries NOUNMAP. BLKZEROOUT
# (blkdiscard -z) carries it; ext4's lazy inode-table init does not, which is
# how a thick volume lost 4 MiB of every 64 MiB a few seconds after its first
# mount. Both reach one fallocate path that the driver refuses while the
# device's discard limit is 0; the block layer then writes zeroes itself.
# So ``discard_max_bytes`` = 0 is the knob that keeps every block allocated:
# fstrim and blkdiscard answer "not supported", mount -o discard is ignored,
# lazy init writes real zeroes. ``write_zeroes_max_bytes`` is read-only;
# ``write_zeroes_unmap_max_bytes`` (6.17+) is 0 for loop devices already,
# and set to 0 as well in case a later kernel offers it.
#
# Since the queue-limits rework (6.9) that setting outlives a detach and
# cannot be undone (the discard granularity then reads 0, and every value
# but 0 is refused): a device left so is removed after its detach, and an
# attach that wants discards (a thin volume) passes over a free one left so.


def _queue_file(name: str, attr: str, sys_block: str) -> str:
    if not _LOOP_NAME.match(name):
        raise ValueError(f"not a loop device name: {name!r}")
    return os.path.join(sys_block, name, "queue", attr)


def _read_queue(name: str, attr: str, sys_block: str) -> int | None:
    try:
        with open(_queue_file(name, attr, sys_block), encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def stop_discards(name: str, sys_block: str = SYS_BLOCK) -> None:
    """Make the device unable to free blocks of its backing file (a thick
    volume's device, for all its life). Idempotent; blocking."""
    for attr in ("discard_max_bytes", "write_zeroes_unmap_max_bytes"):
        value = _read_queue(name, attr, sys_block)
        if value is None and attr == "write_zeroes_unmap_max_bytes":
            continue  # older kernels have no such limit
        if value == 0:
            continue
        try:
            with open(_queue_file(name, attr, sys_block), "w", encoding="ascii") as f:
                f.write("0")
        except OSError as e:
            raise FailedPrecondition(
                f"cannot turn off discards on /dev/{name} ({attr}: {e.strerror}); a thick volume would lose "
                "its allocation: the node plugin needs a writable /sys"
            ) from e


def discards_stopped(name: str, sys_block: str = SYS_BLOCK) -> bool:
    """The device's driver could discard, but :func:`stop_discards` (or anyone)
    turned it off; attached or not."""
    limit = _read_queue(name, "discard_max_bytes", sys_block)
    hardware = _read_queue(name, "discard_max_hw_bytes", sys_block)
    return limit == 0 and bool(hardware)


def device_numbers(name: str) -> tuple[int, int]:
    st = os.stat("/dev/" + name)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


class LoopTool:
    """Attach, detach and resize loop devices: through the loop ioctls (no
    process per call) where the kernel has LOOP_CONFIGURE, else losetup
    through the shared runner."""

    def __init__(
        self,
        runner: Runner,
        *,
        direct_io: bool = True,
        sys_block: str = SYS_BLOCK,
        use_ioctl: bool | None = None,
        identity: Callable[[str], Identity | None] = loopctl.backing_identity,
    ) -> None:
        self._run = runner
        self._direct_io = direct_io
        self._sys_block = sys_block
        self._identity = identity
        self._ioctl = loopctl.supported() if use_ioctl is None else use_ioctl
        # One attach at a time: concurrent LOOP_CTL_GET_FREE calls all return the
        # same device and all but one then retry on EBUSY.
        self._attaching = asyncio.Lock()
        # backing file -> loop device name, for the files this process manages.
        # A scan reads one sysfs file per attached device: O(attached) on every
        # lookup is what made stage slower as a node filled. Entries are seeded
        # by one scan at startup, kept by attach/detach, and re-checked against
        # sysfs (one read) whenever they are used.
        self._index: dict[str, str] = {}
        # File identity -> device, for the devices seed() found whose path does
        # not match (attached through a mount that is gone).
        self._strangers: dict[Identity, str] = {}

    def seed(self) -> None:
        """Index every attached device (startup: a previous instance may have
        attached volumes). Blocking. Devices a previous instance attached from
        another mount namespace show another path: they are indexed by the
        identity of their file, and found by it at their first lookup."""
        self._index = {}
        self._strangers = {}
        for d in scan(self._sys_block):
            if d.deleted:
                continue
            self._index[d.backing_file] = d.name
            ident = self._identity(d.name)
            if ident is not None:
                self._strangers[ident] = d.name

    def lookup(self, backing_file: str) -> LoopDevice | None:
        """The device the file is attached to as far as this process knows
        (attached by it, or found at seed()), checked against the kernel."""
        name = self._index.get(backing_file)
        if name is None:
            ident = file_identity(backing_file) if self._strangers else None
            name = self._strangers.get(ident) if ident is not None else None
            if name is None:
                return None
        if self._is_attached_to(name, backing_file):
            self._index[backing_file] = name
            return LoopDevice(name, backing_file, False)
        self._index.pop(backing_file, None)  # detached behind our back
        return None

    def _is_attached_to(self, name: str, backing_file: str) -> bool:
        try:
            with open(
                os.path.join(self._sys_block, name, "loop", "backing_file"), encoding="utf-8", errors="surrogateescape"
            ) as f:
                path, deleted = parse_backing_file(f.read())
        except OSError:
            return False
        if deleted:
            return False
        if path == backing_file:
            return True
        want = file_identity(backing_file)
        return want is not None and self._identity(name) == want

    def find_all(self, backing_file: str) -> list[LoopDevice]:
        """Every device attached to the file, by a full scan (for decisions that
        must not trust the index, such as refusing to delete a volume in use)."""
        found = find(backing_file, self._sys_block, self._identity)
        if found:
            self._index[backing_file] = found[0].name
        return found

    async def attach(self, backing_file: str, block_size: int = 0, *, discards: bool = True) -> LoopDevice:
        """Attach the file, or return the device it is already attached to.
        ``block_size`` is the device's logical block size (0: the kernel's 512).
        ``discards=False`` keeps every block of the file allocated for as long
        as the device lives (see :func:`stop_discards`); it is applied again
        to a device found attached, which an older driver may have left."""
        existing = self.lookup(backing_file)
        if existing is not None:
            if not discards:
                await asyncio.to_thread(stop_discards, existing.name, self._sys_block)
            return existing
        async with self._attaching:
            if self._ioctl:
                avoid = None if not discards else self._discards_stopped
                name = await asyncio.to_thread(loopctl.attach, backing_file, self._direct_io, block_size, avoid)
            else:
                name = await self._losetup_attach(backing_file, block_size)
            self._index[backing_file] = name
            if not discards:
                # Before the caller (mkfs, mount) can write anything through it.
                await asyncio.to_thread(stop_discards, name, self._sys_block)
        found = self.lookup(backing_file)
        if found is None:
            raise Internal(f"/dev/{name} is not attached to the volume's backing file after attaching")
        return found

    def _discards_stopped(self, n: int) -> bool:
        return discards_stopped(f"loop{n}", self._sys_block)

    async def stop_discards(self, name: str) -> None:
        """:func:`stop_discards` on an attached device (a volume made thick while staged)."""
        await asyncio.to_thread(stop_discards, name, self._sys_block)

    async def attach_read_only(self, device: str, block_size: int) -> str:
        """A new read-only loop device over the block device ``device``; its
        name. Buffered, so reads go through the device's own page cache and see
        what writers through the device wrote. Never reuses a device (the
        caller looks for one it already made)."""
        async with self._attaching:
            if self._ioctl:
                return await asyncio.to_thread(loopctl.attach, device, False, block_size, None, True)
            return await self._losetup_attach(device, block_size, read_only=True)

    async def _losetup_attach(self, backing_file: str, block_size: int = 0, *, read_only: bool = False) -> str:
        argv = ["losetup", "--find", "--show"]
        argv += ["--read-only"] if read_only else ["--nooverlap"]
        if block_size:
            argv.append(f"--sector-size={block_size}")
        if self._direct_io and not read_only:
            # Direct I/O skips the double page cache (pool fs + volume fs).
            argv.append("--direct-io=on")
        argv += ["--", backing_file]
        res = await self._run.run(argv)
        dev = res.text.strip()
        name = os.path.basename(dev)
        if not _LOOP_NAME.match(name):
            raise Internal(f"losetup returned an unexpected device name {dev!r}")
        return name

    async def detach(self, name: str) -> None:
        if not _LOOP_NAME.match(name):
            raise ValueError(f"not a loop device name: {name!r}")
        for path, n in list(self._index.items()):
            if n == name:
                del self._index[path]
        if self._ioctl:
            before = self._backing_path(name)
            await asyncio.to_thread(loopctl.detach, name)
            await self._wait_detached(name, before)
        else:
            try:
                await self._run.run(["losetup", "--detach", "/dev/" + name])
            except CommandError:
                # Already gone is fine; anything else is re-raised below.
                if os.path.exists(os.path.join(self._sys_block, name, "loop", "backing_file")):
                    raise
        await self._remove_if_discards_stopped(name)

    async def _remove_if_discards_stopped(self, name: str) -> None:
        """A device whose discards were stopped keeps that after its detach
        (see the notes above :func:`stop_discards`): remove it, so no later
        volume, ELV's or anyone's, gets a device that cannot discard. Under
        the attach lock, so this driver's own attach is never handed it
        meanwhile; if someone else took it, it stays (EBUSY)."""
        async with self._attaching:
            if await asyncio.to_thread(discards_stopped, name, self._sys_block):
                removed = await asyncio.to_thread(loopctl.remove, int(name[4:]))
                log.debug("removed /dev/%s after its detach: %s", name, removed)

    def _backing_path(self, name: str) -> str | None:
        """The device's backing file as sysfs names it, or None if detached."""
        try:
            with open(
                os.path.join(self._sys_block, name, "loop", "backing_file"), encoding="utf-8", errors="surrogateescape"
            ) as f:
                return f.read()
        except OSError:
            return None

    async def _wait_detached(self, name: str, before: str | None, timeout: float = 5.0) -> None:
        """The kernel finishes a detach at the device's last close; wait (bounded)
        until the device no longer holds the file it held. Another process (a
        second driver, any loop user) may attach the freed device to its own
        file at once: that device is detached from ours, not "still attached"."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.001
        while before is not None and self._backing_path(name) == before:
            if loop.time() > deadline:
                raise Internal(f"/dev/{name} is still attached; something holds it open")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def refresh_capacity(self, name: str) -> int:
        """Make the device see its backing file's new size; returns the size."""
        if not _LOOP_NAME.match(name):
            raise ValueError(f"not a loop device name: {name!r}")
        if self._ioctl:
            await asyncio.to_thread(loopctl.set_capacity, name)
        else:
            await self._run.run(["losetup", "--set-capacity", "/dev/" + name])
        return size_bytes(name, self._sys_block)
