"""The contract every storage backend keeps.

The CSI services only validate requests and translate; everything that
touches storage is behind these protocols. :class:`ControllerBackend` is what
the controller and group-controller services call, :class:`NodeBackend` what
the node work (csi.node) calls; a backend module's ``build(config, runner)``
makes a :class:`Backend`, which is both, and raises ConfigError for a
configuration it cannot serve.

Each method documents its idempotency, because CSI callers retry
everything: the same call repeated must give the same answer and leave the
same state. The checks every backend makes the same way (is a retry the same
request, does a clone fit its source, is a parameter's value allowed) are
written here, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from csi.errors import AlreadyExists, FailedPrecondition, InvalidArgument, OutOfRange
from csi.model import (
    AccessType,
    Capacity,
    Device,
    GroupSnapshot,
    Health,
    PoolStats,
    Snapshot,
    Volume,
    VolumeSpec,
)

# -- StorageClass parameters ------------------------------------------------------------


@dataclass(frozen=True)
class Parameters:
    """The StorageClass parameters a backend takes. Request validation reads
    this declaration and nothing else, so each key and value set is written
    once, in the backend that gives it meaning."""

    #: Each key, with its closed set of values, or None where the backend
    #: checks the value itself (a device class is one of the configured names).
    values: Mapping[str, frozenset[str] | None]
    #: Keys a VolumeAttributesClass may set too (ControllerModifyVolume).
    mutable: frozenset[str] = frozenset()
    #: Keys that only choose where a volume lives. The volume's ID names that
    #: place already, so a retry that spells out the default is the same request.
    placement: frozenset[str] = frozenset()

    @property
    def mutable_values(self) -> dict[str, frozenset[str] | None]:
        return {k: v for k, v in self.values.items() if k in self.mutable}


def check_values(parameters: Mapping[str, str], declared: Mapping[str, frozenset[str] | None], field: str) -> None:
    """Refuse a value outside its key's closed set (keys not declared are the caller's to refuse)."""
    for k, v in parameters.items():
        ok = declared.get(k)
        if ok is not None and v not in ok:
            raise InvalidArgument(f"{field} {k}={v!r} is not one of: {', '.join(sorted(ok))}")


#: Mutable parameters are kept with the others, this prefix marking them, in
#: the records that outlive the process (the loop pool's JSON, LVM tags).
MUTABLE_PREFIX = "mutable:"


def stored_parameters(parameters: Mapping[str, str], mutable: Mapping[str, str]) -> dict[str, str]:
    """One map of a volume's parameters, in the format its record keeps."""
    return {**parameters, **{MUTABLE_PREFIX + k: v for k, v in mutable.items()}}


def split_parameters(stored: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(parameters, mutable parameters) from a record's one map."""
    fixed = {k: v for k, v in stored.items() if not k.startswith(MUTABLE_PREFIX)}
    mutable = {k[len(MUTABLE_PREFIX) :]: v for k, v in stored.items() if k.startswith(MUTABLE_PREFIX)}
    return fixed, mutable


# -- the checks every backend makes ----------------------------------------------------


def check_compatible(existing: Volume, spec: VolumeSpec, placement: frozenset[str] = frozenset()) -> None:
    """A CreateVolume retry that finds the volume made: AlreadyExists unless it
    is what ``spec`` asks for (or bigger, within the request's limit: the spec
    forbids answering with a volume larger than ``limit_bytes``)."""
    diffs = []
    if existing.name != spec.name:
        diffs.append("name")
    if existing.size < spec.size:
        diffs.append(f"size ({existing.size} < {spec.size})")
    if spec.limit and existing.size > spec.limit:
        diffs.append(f"size ({existing.size} > limit_bytes {spec.limit})")
    if existing.access != spec.access:
        diffs.append(f"access type ({existing.access.value})")
    if existing.fs_type != spec.fs_type:
        diffs.append(f"filesystem ({existing.fs_type})")
    ours = {k: v for k, v in existing.parameters.items() if k not in placement}
    theirs = {k: v for k, v in spec.parameters.items() if k not in placement}
    if ours != theirs or dict(existing.mutable) != dict(spec.mutable):
        diffs.append("parameters")
    if existing.source != spec.source:
        diffs.append("content source")
    if diffs:
        raise AlreadyExists(f"volume {spec.name!r} already exists with a different " + ", ".join(diffs))


def check_source_fits(spec: VolumeSpec, access: AccessType, fs: str | None, size: int) -> None:
    """A new volume made from a snapshot or volume of this access type,
    filesystem (None: none yet) and size must be able to hold it."""
    if access != spec.access:
        raise FailedPrecondition(f"the source is a {access.value} volume; the new volume must be {access.value} too")
    if spec.access == AccessType.MOUNT and fs and spec.fs_type and fs != spec.fs_type:
        raise FailedPrecondition(f"the source holds {fs}; a clone of it cannot be {spec.fs_type}")
    if spec.size < size:
        raise OutOfRange(f"the new volume ({spec.size} bytes) is smaller than its source ({size} bytes)")


def member_name(group_name: str, volume_id: str) -> str:
    """The (internal) name of a group member's snapshot (its record keeps it).
    U+0001 cannot occur in a CSI name, so this never collides with a user's."""
    return f"\x01group\x01{group_name}\x01{volume_id}"


# -- the protocols ---------------------------------------------------------------------


class Common(Protocol):
    """What both halves ask of a backend."""

    kind: str
    #: Sizes are multiples of this.
    granularity: int

    async def probe(self) -> None:
        """Raise Unavailable unless the backend can serve requests."""

    async def pool_stats(self) -> list[PoolStats]:
        """Size, use and promisable space of each pool (cheap; called every few seconds)."""

    async def get_volume(self, volume_id: str) -> Volume | None:
        """The volume, or None."""

    async def expand_volume(self, volume_id: str, size: int) -> Volume:
        """Grow to at least ``size``; already big enough is success."""

    async def health(self, volume_id: str, *, node: bool = True) -> Health:
        """The volume's condition. ``node=False`` is the controller's view (is the
        data there?); ``node=True`` also checks the node side (is the device up?)."""


class ControllerBackend(Common, Protocol):
    """Volumes and snapshots as the controller services see them."""

    parameters: Parameters
    min_size: int

    async def create_volume(self, spec: VolumeSpec) -> Volume:
        """Create the volume, or return it if one of that name exists and
        matches ``spec``. A new volume gets a new ID (csi.model.ids.new), never
        one an earlier volume had. Raises AlreadyExists if it exists and
        differs, NotFound if the source is missing, ResourceExhausted if there
        is no room. A failure leaves nothing behind under the volume's name.
        Creates of one name must not overlap: the caller serialises them (the
        services' gate, on the name)."""

    async def delete_volume(self, volume_id: str) -> None:
        """Delete the volume. Missing is success. InUse while staged/published."""

    async def list_volumes(self) -> list[Volume]:
        """Every volume, sorted by ID."""

    async def capacity(self, parameters: Mapping[str, str]) -> Capacity:
        """What can still be promised for a volume with these parameters."""

    async def create_snapshot(self, name: str, source_volume_id: str) -> Snapshot:
        """Snapshot the volume (crash-consistent), or return the existing
        snapshot of that name. AlreadyExists if the name has another source.
        A new snapshot gets a new ID, as a new volume does."""

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete the snapshot. Missing is success."""

    async def get_snapshot(self, snapshot_id: str) -> Snapshot | None: ...

    async def list_snapshots(self) -> list[Snapshot]:
        """Every snapshot, sorted by ID."""

    async def set_attachment(self, volume_id: str, node_id: str, readonly: bool | None) -> Volume:
        """Record (readonly is a bool) or forget (None) a controller publish."""

    async def modify_volume(self, volume_id: str, mutable: Mapping[str, str]) -> Volume:
        """Apply mutable parameters (already validated against the declaration)."""

    async def create_group_snapshot(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        """Snapshot several volumes at one point in time, or return the existing
        group of that name (AlreadyExists if it has other members). A new
        group, and each of its snapshots, gets a new ID."""

    async def delete_group_snapshot(self, group_id: str) -> None:
        """Delete the group and its member snapshots. Missing is success."""

    async def get_group_snapshot(self, group_id: str) -> GroupSnapshot | None: ...


class NodeBackend(Common, Protocol):
    """A volume's block device on this node, and the records the node keeps."""

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


class SnapshotPart(Protocol):
    """A backend's snapshots and group snapshots, kept in a part of their own."""

    async def get(self, snapshot_id: str) -> Snapshot | None: ...

    async def all(self) -> list[Snapshot]: ...

    async def create(self, name: str, source_volume_id: str) -> Snapshot: ...

    async def delete(self, snapshot_id: str) -> None: ...

    async def create_group(self, name: str, volume_ids: list[str]) -> GroupSnapshot: ...

    async def delete_group(self, group_id: str) -> None: ...

    async def get_group(self, group_id: str) -> GroupSnapshot | None: ...


class SnapshotsByPart:
    """ControllerBackend's snapshot methods, each handed to the backend's
    :class:`SnapshotPart` (``snaps``); their contracts are documented there."""

    snaps: SnapshotPart

    async def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        return await self.snaps.get(snapshot_id)

    async def list_snapshots(self) -> list[Snapshot]:
        return await self.snaps.all()

    async def create_snapshot(self, name: str, source_volume_id: str) -> Snapshot:
        return await self.snaps.create(name, source_volume_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.snaps.delete(snapshot_id)

    async def create_group_snapshot(self, name: str, volume_ids: list[str]) -> GroupSnapshot:
        return await self.snaps.create_group(name, volume_ids)

    async def delete_group_snapshot(self, group_id: str) -> None:
        await self.snaps.delete_group(group_id)

    async def get_group_snapshot(self, group_id: str) -> GroupSnapshot | None:
        return await self.snaps.get_group(group_id)


class Backend(ControllerBackend, NodeBackend, Protocol):
    """Both halves, as a backend module's ``build(config, runner)`` makes them."""

    async def start(self) -> None:
        """Recover from a crash: finish or remove anything half-made."""

    async def stop(self) -> None:
        """Stop background work at shutdown (the driver then reaps any command left)."""
