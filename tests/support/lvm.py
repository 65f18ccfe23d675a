"""The in-guest LVM test bed: a VG on loop files, and ``elv serve --backend lvm``.

These tests run only inside the test VM (scripts/lvm-vm): the CI machine's own
kernel has no device-mapper. Everything they make (LVs, the VG, its PVs, the
loop devices and files) is removed at the end, even after a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass

from tests.support.driver import Driver

MiB = 1024 * 1024
GiB = 1024 * MiB
LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
#: LVM as the tests run it: no udev, no dmeventd (the guest has no use for either).
LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 verify_udev_operations=1 monitoring=0} devices{obtain_device_list_from_udev=0}"
)
LV_FIELDS = "lv_name,lv_size,lv_attr,lv_tags,pool_lv,origin,lv_kernel_major,lv_kernel_minor,segtype,data_percent"
#: The tag that makes an LV ELV's (csi.backend.lvm.model; the tests' driver name).
OWNER_TAG = "elv.owner=elv.csi.dev"


def lvm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["lvm", args[0], "--config", LVM_CONFIG, *args[1:]]
    env = dict(os.environ, **LVM_ENV)
    return subprocess.run(argv, capture_output=True, text=True, check=check, env=env, timeout=300)


def lvs(vg: str) -> list[dict[str, str]]:
    out = lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS, vg).stdout
    rows: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
    return rows


def ours(vg: GuestVg) -> list[str]:
    """The owner filter: the LVs of ``vg`` that carry ELV's owner tag."""
    return sorted(r["lv_name"] for r in lvs(vg.name) if OWNER_TAG in r["lv_tags"].split(","))


def lv(vg: str, name: str) -> dict[str, str] | None:
    return next((r for r in lvs(vg) if r["lv_name"] == name), None)


def wait_for(cond: object, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    raise TimeoutError(f"{what} not reached within {timeout}s")


@dataclass
class GuestVg:
    name: str
    pool: str
    pvs: list[str]
    files: list[str]  # the PVs' loop backing files ([] on disks)


class BackingTooSmall(AssertionError):
    """The PVs' backing cannot hold what they may grow to: say so before LVM
    is handed PVs whose writes would fail with EIO half-way through a run."""


def guest_disks(prefix: str) -> dict[int, tuple[str, int]]:
    """The guest's disks whose serial is ``<prefix>-<i>`` (scripts/lvm-vm makes
    them): i -> (device node, size in bytes)."""
    found: dict[int, tuple[str, int]] = {}
    for dev in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{dev}/serial", encoding="utf-8") as f:
                serial = f.read().strip()
            with open(f"/sys/block/{dev}/size", encoding="utf-8") as f:
                size = int(f.read()) * 512
        except (OSError, ValueError):
            continue
        head, _, idx = serial.rpartition("-")
        if head == prefix and idx.isdigit():
            found[int(idx)] = (f"/dev/{dev}", size)
    return found


def backing_room(workdir: str) -> tuple[int, str]:
    """Free bytes of the filesystem holding ``workdir``, and its type."""
    st = os.statvfs(workdir)
    fstype = "?"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        best = -1
        real = os.path.realpath(workdir)
        for line in f:
            fields = line.split()
            mp, sep = fields[4], fields.index("-")
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) > best:
                best, fstype = len(mp), fields[sep + 1]
    return st.f_bavail * st.f_frsize, fstype


def make_pvs(
    name: str, workdir: str, sizes: tuple[int, ...], pattern: bytes | None = None
) -> tuple[list[str], list[str]]:
    """PVs for VG ``name``: the guest's disks ``<name>-<i>`` if scripts/lvm-vm
    made them, else loop files in ``workdir`` (sparse, or filled with
    ``pattern``), after checking the filesystem can hold all of it.
    Returns (PVs, loop backing files)."""
    disks = guest_disks(name)
    if pattern is None and all(i in disks for i in range(len(sizes))):
        for i, want in enumerate(sizes):
            if disks[i][1] < want:
                raise BackingTooSmall(f"disk {disks[i][0]} ({name}-{i}) has {disks[i][1]} bytes, not {want}")
        return [disks[i][0] for i in range(len(sizes))], []
    need = sum(sizes)
    free, fstype = backing_room(workdir)
    if free < need:
        raise BackingTooSmall(
            f"the PVs of VG {name} are loop files in {workdir} ({fstype}) that may grow to {need >> 20} MiB, "
            f"but it has {free >> 20} MiB free: writes through them would fail with EIO once it fills "
            f"(scripts/lvm-vm gives each stream disks of its own, serial {name}-0, {name}-1)"
        )
    files: list[str] = []
    pvs: list[str] = []
    try:
        for i, size in enumerate(sizes):
            files.append(backing_file(os.path.join(workdir, f"{name}-pv{i}.img"), size, pattern))
            dev = subprocess.run(["losetup", "-f", "--show", files[-1]], capture_output=True, text=True, check=True)
            pvs.append(dev.stdout.strip())
    except BaseException:
        for pv in pvs:
            subprocess.run(["losetup", "-d", pv], check=False, capture_output=True)
        for path in files:
            os.unlink(path)
        raise
    return pvs, files


def backing_file(path: str, size: int, pattern: bytes | None) -> str:
    """A file of ``size`` bytes: sparse, or every byte ``pattern`` repeated."""
    with open(path, "wb") as f:
        if pattern:
            block = (pattern * (MiB // len(pattern) + 1))[:MiB]
            for _ in range(size // MiB):
                f.write(block)
        f.truncate(size)
    return path


def make_vg(
    name: str,
    workdir: str,
    sizes: tuple[int, ...] = (4 * GiB, 4 * GiB),
    *,
    pool_size: str = "1g",
    pool_args: tuple[str, ...] = (),
    pattern: bytes | None = None,
) -> GuestVg:
    pvs, files = make_pvs(name, workdir, sizes, pattern)
    vg = GuestVg(name, "pool0", pvs, files)
    try:
        # Disks may still carry a label of an earlier pytest run in this guest.
        lvm("pvcreate", "-q", "-ff", "-y", *pvs)
        lvm("vgcreate", "-q", name, *pvs)
        if pool_size:
            lvm(
                "lvcreate",
                "-q",
                "-y",
                "--type",
                "thin-pool",
                "-Z",
                "y",
                *pool_args,
                "-n",
                vg.pool,
                "-L",
                pool_size,
                name,
            )
    except BaseException:
        destroy_vg(vg)
        raise
    return vg


def destroy_vg(vg: GuestVg) -> list[str]:
    """Remove everything; return what could not be removed."""
    problems = []
    for r in lvs(vg.name) if lvm("vgs", vg.name, check=False).returncode == 0 else []:
        if r["lv_kernel_major"] not in ("", "-1"):
            lvm("lvchange", "-an", f"{vg.name}/{r['lv_name']}", check=False)
    if lvm("vgs", vg.name, check=False).returncode == 0:
        res = lvm("vgremove", "-f", "-y", vg.name, check=False)
        if res.returncode != 0:
            problems.append(f"vgremove: {res.stderr.strip()}")
    for pv in vg.pvs:
        lvm("pvremove", "-q", "-y", pv, check=False)
        if vg.files:
            subprocess.run(["losetup", "-d", pv], check=False, capture_output=True)
    for f in vg.files:
        if os.path.exists(f):
            os.unlink(f)
    return problems


def write_config(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def class_config(vg: GuestVg, default: str = "thick", udev: str = "off", ratio: float = 1.0) -> str:
    return f"""
default-class = "{default}"
udev = "{udev}"
monitoring = false
freeze-dir = "/run/elv-test-freeze-{vg.name}"

[[device-class]]
name = "thick"
vg = "{vg.name}"

[[device-class]]
name = "thin"
vg = "{vg.name}"
thin-pool = "{vg.pool}"
overprovision-ratio = {ratio}
"""


class LvmDriver(Driver):
    """``elv serve --backend lvm`` with the given backend arguments."""

    def __init__(self, base: str, backend_args: list[str], *extra: str) -> None:
        super().__init__(base, *extra)
        self.backend_args = backend_args

    def wait_ready(self, timeout: float = 120.0) -> None:
        # Python imports over 9p under emulation take many seconds, then lvs runs.
        super().wait_ready(timeout)

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--backend")
        # Replace "--backend loop --loop-dir POOL" with the lvm arguments.
        return [*argv[:i], "--backend", "lvm", *self.backend_args, *argv[i + 4 :]]
