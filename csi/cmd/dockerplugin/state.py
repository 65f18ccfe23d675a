"""What the plugin keeps per volume, beneath the driver's kubelet directory.

``<kubelet-dir>/plugins/<driver>/docker-plugin/<plugin>/<volume ID>/``:

- ``staging``: the volume's NodeStageVolume path;
- ``mnt``: its NodePublishVolume path, the mountpoint the engine gets;
- ``refs/``: one empty file per mount ID the engine holds. Docker sends a new
  random ID for every mount and the same volume may serve several containers,
  so the volume is unpublished only when the last reference goes.

The mount table is the truth for what is mounted: references only count
while ``mnt`` is mounted (after a reboot, or if someone unmounted it, they
are stale and dropped). A reference is written before the engine is told the
mount succeeded and removed before the unmount, so a plugin that restarts
finds exactly the mounts some container still uses, and a mount without any
reference is a leftover of its own that it may undo.

A mount ID arrives from the engine: it only ever names a file through its
SHA-256, never as a path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re

from csi.host.mountinfo import MountTable

#: Volume IDs come from the driver, but are checked before they name a directory.
_VOLUME_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
MAX_MOUNT_ID = 256


def plugin_dir(kubelet_dir: str, driver: str, plugin: str) -> str:
    return os.path.join(kubelet_dir, "plugins", driver, "docker-plugin", plugin)


def _ref_name(mount_id: str) -> str:
    return hashlib.sha256(mount_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VolumeDir:
    def __init__(self, base: str, volume_id: str) -> None:
        if not _VOLUME_ID.match(volume_id):
            raise ValueError(f"unexpected volume ID {volume_id!r}")
        self.volume_id = volume_id
        self.root = os.path.join(base, volume_id)
        self.staging = os.path.join(self.root, "staging")
        self.target = os.path.join(self.root, "mnt")
        self._refs = os.path.join(self.root, "refs")

    def prepare(self) -> None:
        os.makedirs(self._refs, mode=0o750, exist_ok=True)
        os.makedirs(self.staging, mode=0o750, exist_ok=True)

    def refs(self) -> set[str]:
        """The reference files (hashed mount IDs) present."""
        try:
            return {n for n in os.listdir(self._refs) if not n.startswith(".")}
        except FileNotFoundError:
            return set()

    def holds(self, mount_id: str) -> bool:
        return _ref_name(mount_id) in self.refs()

    def add_ref(self, mount_id: str) -> None:
        os.makedirs(self._refs, mode=0o750, exist_ok=True)
        path = os.path.join(self._refs, _ref_name(mount_id))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        _fsync_dir(self._refs)

    def drop_ref(self, mount_id: str) -> bool:
        """Remove one reference; False if it was not there."""
        try:
            os.unlink(os.path.join(self._refs, _ref_name(mount_id)))
        except FileNotFoundError:
            return False
        _fsync_dir(self._refs)
        return True

    def clear_refs(self) -> int:
        n = 0
        for name in self.refs():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._refs, name))
                n += 1
        return n

    @staticmethod
    def _is_mount(table: MountTable, path: str) -> bool:
        return table.top(os.path.realpath(path)) is not None

    def published(self, table: MountTable) -> bool:
        return self._is_mount(table, self.target)

    def staged(self, table: MountTable) -> bool:
        return self._is_mount(table, self.staging)

    def in_use(self, table: MountTable) -> int:
        """How many mount IDs hold the volume (0 unless it is really mounted)."""
        return len(self.refs()) if self.published(table) else 0

    def remove(self) -> None:
        """Forget the volume: its (unmounted, unreferenced) directory goes."""
        for d in (self._refs, self.staging, self.target, self.root):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def volume_ids(base: str) -> list[str]:
    """The volumes the plugin has a directory for."""
    try:
        return sorted(n for n in os.listdir(base) if _VOLUME_ID.match(n))
    except FileNotFoundError:
        return []
