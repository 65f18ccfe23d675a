"""The domain: the types every layer shares, and nothing else.

A request is validated into these (services), a backend answers with them,
the node code and the command line read them. So this package imports
nothing else of ``csi`` (import-linter holds that): not even the generated
CSI messages, whose numbering :class:`Mode` copies from the spec.

* access: :class:`AccessType`, :class:`Mode`, :class:`Capability`;
* the filesystem policy: which filesystems ELV makes, and how small each may be;
* volumes and snapshots: the validated request (:class:`VolumeSpec`) and the
  records a backend returns (:class:`Volume`, :class:`Snapshot`, ...);
* the keys ELV puts into a volume's ``volume_context`` and the parameter
  keys more than one layer reads;
* :mod:`csi.model.ids`: the format of volume, snapshot and group IDs.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

# -- access ---------------------------------------------------------------------------


class AccessType(enum.Enum):
    MOUNT = "mount"
    BLOCK = "block"


class Mode(enum.IntEnum):
    """The single-node access modes ELV serves, numbered as the CSI spec numbers
    them (``VolumeCapability.AccessMode.Mode``; a unit test compares)."""

    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7


@dataclass(frozen=True)
class Capability:
    access: AccessType
    mode: Mode
    fs_type: str | None
    mount_flags: tuple[str, ...]


def round_up(n: int, unit: int) -> int:
    """``n`` rounded up to a multiple of ``unit`` (a size to a granularity or an extent)."""
    return -(-n // unit) * unit


# -- the filesystem policy --------------------------------------------------------------

SUPPORTED_FS = ("ext4", "xfs")
DEFAULT_FS = "ext4"
#: Smallest filesystem each type can hold. xfsprogs >= 5.19 refuses < 300 MiB.
MIN_FS_BYTES = {"ext4": 16 * 1024 * 1024, "xfs": 300 * 1024 * 1024}


# -- volumes and snapshots --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    kind: Literal["snapshot", "volume"]
    id: str


@dataclass(frozen=True)
class VolumeSpec:
    """A validated CreateVolume request."""

    name: str
    size: int
    access: AccessType
    fs_type: str | None  # None for raw block
    thick: bool = False
    source: Source | None = None
    #: StorageClass parameters that shape the volume; a retry must match them.
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: Mutable parameters (a VolumeAttributesClass) it is created with.
    mutable: Mapping[str, str] = field(default_factory=dict)
    #: The request's ``limit_bytes`` (0: none). ``size`` is within it; a
    #: volume of this name that already exists must be too.
    limit: int = 0


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    size: int
    access: AccessType
    fs_type: str | None
    thick: bool
    source: Source | None
    parameters: Mapping[str, str]
    created_ns: int
    #: The filesystem the node put on it (durable "formatted" record), if any.
    formatted: str | None = None
    #: Set just before mkfs starts and cleared when ``formatted`` is recorded:
    #: what is on the device then is our own unfinished mkfs, never user data.
    formatting: str | None = None
    #: ControllerPublishVolume records: node ID -> readonly.
    attachments: Mapping[str, bool] = field(default_factory=dict)
    #: The device's logical block size, where the backend chooses it (loop).
    block_size: int | None = None
    #: The mutable parameters it was created with (a later modify leaves them).
    mutable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    source_volume_id: str
    size: int
    created_ns: int
    ready: bool = True
    group_id: str | None = None
    access: AccessType = AccessType.MOUNT
    fs_type: str | None = None
    block_size: int | None = None


@dataclass(frozen=True)
class GroupSnapshot:
    id: str
    name: str
    snapshots: tuple[Snapshot, ...]
    created_ns: int


@dataclass(frozen=True)
class Capacity:
    available: int
    maximum_volume_size: int
    minimum_volume_size: int


@dataclass(frozen=True)
class PoolStats:
    """One pool or device class, for metrics and ``elv doctor``."""

    pool: str
    size_bytes: int
    used_bytes: int
    available_bytes: int
    volumes: int
    snapshots: int
    thin_data_percent: float | None = None
    thin_metadata_percent: float | None = None


@dataclass(frozen=True)
class Device:
    name: str  # kernel name, e.g. "loop3"
    path: str  # "/dev/loop3"
    major: int
    minor: int


@dataclass(frozen=True)
class Health:
    abnormal: bool
    message: str


# -- keys of the CSI messages -------------------------------------------------------------

#: StorageClass parameters that more than one layer reads (the backends
#: declare the rest, with every value set, in their own ``Parameters``).
#: "thick" allocates a volume's space at once (the services set
#: VolumeSpec.thick from it; the loop backend also lets it change later).
PROVISIONING = "elv.csi.dev/provisioning"
#: The LVM device class a volume lives in (``elv volume create --class``).
DEVICE_CLASS = "elv.csi.dev/device-class"
#: Which ELV tool made a volume (today only ``docker-plugin``). Recorded with the
#: volume and shown in its ``volume_context``, so the Docker volume plugin lists
#: and removes only the volumes it made, never a Kubernetes PV or a volume that
#: ``elv volume create`` made.
CREATED_BY = "elv.csi.dev/created-by"

#: What ELV puts into a volume's ``volume_context``, so tools (``elv volume
#: list``) can show it; the driver itself never trusts volume_context.
#: (``CREATED_BY`` goes there too, for a volume made with it.)
NAME_KEY = "elv.csi.dev/name"
FS_KEY = "elv.csi.dev/fs"
ACCESS_KEY = "elv.csi.dev/access"
