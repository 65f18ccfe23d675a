"""The contract every storage backend keeps.

The CSI services only validate requests and translate; everything that
touches storage is behind :class:`Backend`. Each method documents its
idempotency, because CSI callers retry everything: the same call repeated
must give the same answer and leave the same state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from csi.model import Capacity, Device, GroupSnapshot, Health, PoolStats, Snapshot, Volume, VolumeSpec


class Backend(Protocol):
    kind: str
    #: Parameter keys (beyond the common ones) a StorageClass may set.
    parameter_keys: frozenset[str]
    #: Keys a VolumeAttributesClass may set (ControllerModifyVolume).
    mutable_keys: frozenset[str]
    granularity: int
    min_size: int

    async def start(self) -> None:
        """Recover from a crash: finish or remove anything half-made."""

    async def stop(self) -> None:
        """Stop background work at shutdown (the driver then reaps any command left)."""

    async def probe(self) -> None:
        """Raise Unavailable unless the backend can serve requests."""

    def volume_id(self, name: str, parameters: Mapping[str, str]) -> str:
        """The ID a volume of this name gets (pure; no I/O)."""

    def snapshot_id(self, name: str, source_volume_id: str) -> str:
        """The ID a snapshot of this name gets (pure; no I/O)."""

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create the volume, or return it if it exists and matches ``spec``.
        Raises AlreadyExists if it exists and differs, NotFound if the source
        is missing, ResourceExhausted if there is no room. A failure leaves
        nothing behind under the volume's name."""

    async def delete_volume(self, volume_id: str) -> None:
        """Delete the volume. Missing is success. InUse while staged/published."""

    async def get_volume(self, volume_id: str) -> Volume | None:
        """The volume, or None."""

    async def list_volumes(self) -> list[Volume]:
        """Every volume, sorted by ID."""

    async def expand_volume(self, volume_id: str, size: int) -> Volume:
        """Grow to at least ``size``; already big enough is success."""

    async def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        """What can still be promised for a volume with these parameters."""

    async def create_snapshot(self, name: str, source_volume_id: str, group_id: str | None = None) -> Snapshot:
        """Snapshot the volume (crash-consistent), or return the existing
        snapshot of that name. AlreadyExists if the name has another source."""

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete the snapshot. Missing is success."""

    async def get_snapshot(self, snapshot_id: str) -> Snapshot | None: ...

    async def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot, sorted by ID."""

    async def set_attachment(self, volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        """Record (readonly is a bool) or forget (None) a controller publish."""

    async def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        """Apply mutable parameters (already validated against the allow-list)."""

    async def create_group_snapshot(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        """Snapshot several volumes at one point in time, or return the existing
        group of that name (AlreadyExists if it has other members)."""

    async def delete_group_snapshot(self, group_id: str) -> None:
        """Delete the group and its member snapshots. Missing is success."""

    async def get_group_snapshot(self, group_id: str) -> GroupSnapshot | None: ...

    async def attach(self, volume_id: str) -> Device:
        """Make the volume's block device exist on this node; reuse it if it does."""

    async def detach(self, volume_id: str) -> None:
        """Remove the block device. Not attached is success."""

    async def find_device(self, volume_id: str) -> Device | None:
        """The attached device, or None."""

    async def refresh_device(self, volume_id: str) -> int:
        """Make an attached device see the volume's current size; return it."""

    async def proven_blank(self, volume_id: str) -> bool:
        """True only when the backend can *prove* the volume reads all zeros
        (e.g. a sparse file with no data); False means "probe it"."""

    async def mark_formatted(self, volume_id: str, fs_type: str, *, complete: bool = True) -> None:
        """Record durably that the volume carries this filesystem; with
        ``complete=False``, record that mkfs is about to start (the intent)."""

    async def health(self, volume_id: str, *, node: bool = True) -> Health:
        """The volume's condition. ``node=False`` is the controller's view (is the
        data there?); ``node=True`` also checks the node side (is the device up?)."""

    async def pool_stats(self) -> list[PoolStats]:
        """Size, use and promisable space of each pool (cheap; called every few seconds)."""
