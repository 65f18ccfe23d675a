"""Watching a guest VG during a long run: its thin pool's fill, what backs its
PVs, and the kernel's complaints about its devices; and, when the run fails,
everything that says why (issue 15: an fsync got EIO after 40 minutes and
the output said nothing about the pool, the backing store or the kernel).

None of it goes through the driver: ``dmsetup status`` (no LVM lock),
``lvs``, sysfs, ``/dev/kmsg`` and the host's record of the guest's disks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tests.support.lvm import GuestVg, lvm

#: Kernel lines that mean a write was lost or a filesystem gave up.
BAD_KERNEL = re.compile(
    r"I/O error|Write error|out-of-data-space|critical space allocation|"
    r"XFS \([^)]*\): (?:.*shut ?down|Corruption|metadata I/O error)|EXT4-fs error|Remounting filesystem read-only",
    re.IGNORECASE,
)
_DEVICE = re.compile(r"\b(dm-\d+|loop\d+|vd[a-z]+|sd[a-z]+)\b|\b(\d+:\d+)\b")
#: Where scripts/lvm-vm writes, every 20 s, how much of each guest disk the host holds.
HOST_USAGE = "ci-out/lvm-disks-usage.txt"


def dm_prefix(vg: str) -> str:
    """Device-mapper names of a VG's LVs start with this (a dash in a name is doubled)."""
    return vg.replace("-", "--") + "-"


@dataclass
class PoolStatus:
    data_percent: float
    metadata_percent: float
    mode: str  # rw, ro, out_of_data_space, Fail
    when_full: str  # queue_if_no_space / error_if_no_space

    def __str__(self) -> str:
        return f"data {self.data_percent:.1f}% metadata {self.metadata_percent:.1f}% {self.mode} {self.when_full}"


def pool_status(vg: str, pool: str) -> PoolStatus | None:
    """The thin pool's kernel status (dmsetup: no LVM lock, so it never waits
    for the driver's LVM commands); None while the pool is not active."""
    name = dm_prefix(vg) + pool.replace("-", "--")
    res = subprocess.run(["dmsetup", "status"], capture_output=True, text=True, check=False, timeout=60)
    for line in res.stdout.splitlines():
        dev, _, rest = line.partition(": ")
        if dev not in (name + "-tpool", name):
            continue
        f = rest.split()
        if len(f) < 8 or f[2] != "thin-pool":
            continue
        if f[3] == "Fail":
            return PoolStatus(float("nan"), float("nan"), "Fail", "")
        mu, mt = (int(x) for x in f[4].split("/"))
        du, dt = (int(x) for x in f[5].split("/"))
        when = next((x for x in f[7:] if x.endswith("_if_no_space")), "")
        return PoolStatus(100.0 * du / dt, 100.0 * mu / mt, f[7], when)
    return None


def backing_usage(vg: GuestVg) -> str:
    """What backs the VG's PVs now: loop files' allocated MiB, or the host's
    record of the guest disks; and the guest's /tmp (RAM-backed)."""
    if vg.files:
        used = sum(os.stat(f).st_blocks * 512 for f in vg.files if os.path.exists(f))
        parts = [f"loop files {used >> 20} MiB"]
    else:
        parts = [f"disks {host_disk_usage(vg.name) or '?'}"]
    tmp = shutil.disk_usage("/tmp")
    parts.append(f"/tmp {tmp.used >> 20}/{tmp.total >> 20} MiB")
    return ", ".join(parts)


def host_disk_usage(vg: str) -> str:
    try:
        with open(HOST_USAGE, encoding="utf-8") as f:
            fields = f.read().split()
    except OSError:
        return ""
    return " ".join(x + " MiB" for x in fields[1:] if x.startswith(vg + "-"))


def our_devices(vg: GuestVg) -> set[str]:
    """The kernel's names for the VG's devices now: dm-N and major:minor of
    every active LV, and the PVs."""
    out = {os.path.basename(pv) for pv in vg.pvs}
    prefix = dm_prefix(vg.name)
    with contextlib.suppress(OSError):
        for dev in os.listdir("/sys/block"):
            if not dev.startswith("dm-"):
                continue
            try:
                with open(f"/sys/block/{dev}/dm/name", encoding="utf-8") as f:
                    name = f.read().strip()
                with open(f"/sys/block/{dev}/dev", encoding="utf-8") as f:
                    majmin = f.read().strip()
            except OSError:
                continue
            if name.startswith(prefix):
                out |= {dev, majmin}
    return out


@dataclass
class KernelWatch:
    """Reads /dev/kmsg from now on, in a thread, and keeps every line that
    BAD_KERNEL matches and that names one of the VG's devices (or no device
    at all: a loop write error names none). The guest runs other test
    streams at once; their devices are not this VG's. The ring buffer would
    lose early lines in a long run, so lines are taken as they come."""

    vg: GuestVg
    interval: float = 1.0
    bad: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> KernelWatch:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(fd, 0, os.SEEK_END)
        self._thread = threading.Thread(target=self._run, args=(fd,), name="kmsg-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        return self.bad

    def _run(self, fd: int) -> None:
        try:
            while True:
                mine = our_devices(self.vg)
                for line in read_kmsg(fd):
                    if BAD_KERNEL.search(line) and self.concerns(line, mine):
                        self.bad.append(line)
                if self._stop.wait(self.interval):
                    # One last read: lines of the final moments.
                    self.bad += [x for x in read_kmsg(fd) if BAD_KERNEL.search(x) and self.concerns(x, mine)]
                    return
        finally:
            os.close(fd)

    def concerns(self, line: str, mine: set[str]) -> bool:
        named = {m.group(1) or m.group(2) for m in _DEVICE.finditer(line)}
        if not named:
            return bool(self.vg.files)  # only loop PVs can give such a line
        return bool(named & mine)


def read_kmsg(fd: int) -> list[str]:
    """Every record waiting on /dev/kmsg, as "[seconds] text"."""
    out: list[str] = []
    while True:
        try:
            rec = os.read(fd, 8192)
        except BlockingIOError:
            return out
        except OSError as e:
            if e.errno == errno.EPIPE:
                continue  # records were overwritten before we read them: go on
            raise
        head, _, text = rec.decode("utf-8", "replace").partition(";")
        parts = head.split(",")
        ts = int(parts[2]) / 1e6 if len(parts) > 2 and parts[2].isdigit() else 0.0
        out.append(f"[{ts:.3f}] {text.splitlines()[0] if text else ''}")


def _run(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({' '.join(argv)}: {e})\n"
    return res.stdout + res.stderr


def failure_report(vg: GuestVg, driver_log: str, kernel_bad: list[str], progress: list[str]) -> str:
    """Everything that says why a run on this VG failed."""
    lvs_a = lvm(
        "lvs",
        "-a",
        "-o",
        "lv_name,lv_attr,lv_size,data_percent,metadata_percent,lv_health_status,lv_when_full,zero,seg_pe_ranges",
        vg.name,
        check=False,
    )
    dmesg = _run(["dmesg"]).splitlines()[-150:]
    sections = [
        ("kernel lines about this VG's devices during the run", "\n".join(kernel_bad) or "(none)"),
        ("progress (every 10 kills)", "\n".join(progress) or "(none)"),
        ("thin pool (dmsetup)", str(pool_status(vg.name, vg.pool))),
        ("backing", backing_usage(vg)),
        ("dmsetup status", _run(["dmsetup", "status"])),
        ("lvs -a", lvs_a.stdout + lvs_a.stderr),
        ("df", _run(["df", "-h"])),
        ("dmesg | tail -150", "\n".join(dmesg)),
        ("driver log, last 20 KB", driver_log[-20000:]),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"failure report {stamp}\n" + "".join(f"\n== {title}\n{body.rstrip()}\n" for title, body in sections)
