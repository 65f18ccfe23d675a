"""What a test sees of the host, read straight from the kernel.

Leak checks and state assertions read /proc/self/mountinfo, /sys/block and
/proc/PID here, and never through the driver's own helpers (csi.host.*): a
check that shares the driver's reading of the mount table shares its bugs,
and then cannot catch them. Nothing here imports csi.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mounted:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: tuple[str, ...]
    fstype: str
    source: str

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def mounts(pid: int | None = None) -> list[Mounted]:
    """Every mount this process (or process ``pid``) sees, in the kernel's order."""
    out = []
    where = f"/proc/{pid}/mountinfo" if pid else "/proc/self/mountinfo"
    with open(where, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            out.append(
                Mounted(
                    int(fields[0]),
                    int(fields[1]),
                    int(major),
                    int(minor),
                    _unescape(fields[3]),
                    _unescape(fields[4]),
                    tuple(fields[5].split(",")),
                    _unescape(fields[sep + 1]),
                    _unescape(fields[sep + 2]),
                )
            )
    return out


def stack(path: str, pid: int | None = None) -> list[Mounted]:
    """The mounts at exactly ``path``, top (the visible one) first; in
    process ``pid``'s mount namespace if given (``path`` as it sees it)."""
    real = path if pid else os.path.realpath(path)
    here = [m for m in mounts(pid) if m.mount_point == real]
    ids = {m.mount_id: m for m in here}
    covered = {m.parent_id for m in here if m.parent_id in ids}
    tops = [m for m in here if m.mount_id not in covered]
    out: list[Mounted] = []
    m = tops[-1] if tops else None
    while m is not None and m not in out:
        out.append(m)
        m = ids.get(m.parent_id)
    return out


def top(path: str, pid: int | None = None) -> Mounted | None:
    s = stack(path, pid)
    return s[0] if s else None


def mounts_under(path: str) -> list[Mounted]:
    """Mounts at or beneath ``path``."""
    real = os.path.realpath(path).rstrip("/")
    return [m for m in mounts() if m.mount_point == real or m.mount_point.startswith(real + "/")]


@dataclass(frozen=True)
class Loop:
    name: str
    backing_file: str  # as sysfs shows it, " (deleted)" removed
    deleted: bool
    readonly: bool
    direct_io: bool

    @property
    def path(self) -> str:
        return "/dev/" + self.name


def loops() -> list[Loop]:
    """Every attached loop device, from /sys/block."""
    out = []
    for name in os.listdir("/sys/block"):
        if not re.fullmatch(r"loop[0-9]+", name):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8", errors="surrogateescape") as f:
                back = f.read().rstrip("\n")
            with open(f"/sys/block/{name}/ro", encoding="ascii") as f:
                ro = f.read().strip() == "1"
            with open(f"/sys/block/{name}/loop/dio", encoding="ascii") as f:
                dio = f.read().strip() == "1"
        except OSError:
            continue  # not attached
        deleted = back.endswith(" (deleted)")
        out.append(Loop(name, back.removesuffix(" (deleted)"), deleted, ro, dio))
    return sorted(out, key=lambda d: int(d.name[4:]))


def loops_under(path: str) -> list[Loop]:
    """Loop devices whose backing file lies beneath ``path`` (deleted or not)."""
    real = os.path.realpath(path).rstrip("/") + "/"
    return [d for d in loops() if d.backing_file.startswith(real)]


def loops_over(device: str) -> list[Loop]:
    """Loop devices whose backing file is the block device ``device`` (/dev/loop3, /dev/dm-2)."""
    return [d for d in loops() if d.backing_file == device]


def processes_using(path: str) -> list[str]:
    """Other processes whose command line, working directory or an open file
    lies beneath ``path``: a driver, or a tool, a test left running."""
    real = os.path.realpath(path).rstrip("/")
    inside = (real, real + "/")
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode("utf-8", "replace").split("\0")
            links = [os.readlink(f"/proc/{pid}/cwd")]
            links += [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue  # gone, or a kernel thread
        hits = [a for a in argv if real in a] + [p for p in links if p == real or p.startswith(inside[1])]
        if hits:
            found.append(f"pid {pid} ({' '.join(argv)[:120].strip()}) uses {hits[0]}")
    return found


def leftovers(path: str) -> list[str]:
    """Mounts and loop devices a test may not leave beneath its scratch
    directory ``path``: mounts at or under it, loop devices backed by files
    under it, and loop devices stacked on those (read-only views)."""
    found = [f"mount {m.mount_point} ({m.fstype} {m.source})" for m in mounts_under(path)]
    ours = loops_under(path)
    nodes = {d.path for d in ours}
    found += [f"loop {d.path} -> {d.backing_file}" for d in ours]
    found += [f"loop {d.path} -> {d.backing_file} (a view)" for d in loops() if d.backing_file in nodes]
    return found


def device_numbers(path: str) -> tuple[int, int]:
    """(major, minor) of the block device node ``path``."""
    rdev = os.stat(path).st_rdev
    return os.major(rdev), os.minor(rdev)
