"""Read the mount table from /proc/self/mountinfo.

This is the only source of truth for "is X mounted". ``os.path.ismount``
compares st_dev of a path and its parent, so it misses a bind mount from the
same filesystem (k8s mount-utils documents the same flaw); mountinfo does not.

Format (proc(5)): ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS``
with space, tab, newline and backslash in paths written as octal escapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
#: The filesystems /dev is, so the ones a bind of a device node shows.
NODE_FILESYSTEMS = frozenset({"devtmpfs", "tmpfs"})

_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """Undo the kernel's octal escaping (``\\040`` is a space)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: str
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]

    @property
    def readonly(self) -> bool:
        return "ro" in self.options


def parse(text: str) -> list[Mount]:
    """Parse the whole table. Malformed lines raise ValueError: a table we can't
    read is not a table we may act on."""
    mounts: list[Mount] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major_s, minor_s = fields[2].split(":", 1)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    major=int(major_s),
                    minor=int(minor_s),
                    root=unescape(fields[3]),
                    mount_point=unescape(fields[4]),
                    options=frozenset(fields[5].split(",")),
                    fstype=unescape(fields[sep + 1]),
                    source=unescape(fields[sep + 2]),
                    super_options=frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset(),
                )
            )
        except (ValueError, IndexError) as e:
            raise ValueError(f"mountinfo line {lineno} is malformed: {line!r}") from e
    return mounts


def read(path: str = MOUNTINFO) -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


class MountTable:
    """A snapshot of the table with the lookups the node service needs."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = mounts

    @classmethod
    def load(cls, path: str = MOUNTINFO) -> MountTable:
        return cls(read(path))

    def at(self, mount_point: str) -> list[Mount]:
        """Mounts stacked at exactly this path, bottom first."""
        return [m for m in self.mounts if m.mount_point == mount_point]

    def top(self, mount_point: str) -> Mount | None:
        """The visible mount at this path, if any."""
        stack = self.at(mount_point)
        if not stack:
            return None
        ids = {m.mount_id for m in stack}
        # The visible one is the mount no other mount at this path sits on.
        parents = {m.parent_id for m in stack if m.parent_id in ids}
        tops = [m for m in stack if m.mount_id not in parents]
        return tops[-1] if tops else stack[-1]

    def stack(self, mount_point: str) -> list[Mount]:
        """Mounts stacked at exactly this path, the visible one first, then the
        one it covers, and so on down (each mount's parent is the one below)."""
        here = {m.mount_id: m for m in self.at(mount_point)}
        out: list[Mount] = []
        m = self.top(mount_point)
        while m is not None and m not in out:
            out.append(m)
            m = here.get(m.parent_id)
        # Mounts the parent chain does not reach (propagation can add such
        # siblings) are still at this path: list them last rather than not at all.
        return out + [m for m in here.values() if m not in out]

    def of_device(self, major: int, minor: int) -> list[Mount]:
        """Every mount of a block device's filesystem (staging and bind mounts)."""
        return [m for m in self.mounts if (m.major, m.minor) == (major, minor)]

    def of_device_node(self, dev_name: str) -> list[Mount]:
        """Bind mounts of a device *node* (raw block publishing), e.g. ``loop3``.

        A device node bound onto a file shows up as a mount of the filesystem
        /dev is (devtmpfs; a tmpfs where a container's /dev is one and the
        node was made there) whose root is the node's path inside /dev.
        """
        want = "/" + dev_name
        return [m for m in self.mounts if m.fstype in NODE_FILESYSTEMS and m.root == want]

    def under(self, prefix: str) -> list[Mount]:
        p = prefix.rstrip("/") + "/"
        return [m for m in self.mounts if m.mount_point.startswith(p)]
