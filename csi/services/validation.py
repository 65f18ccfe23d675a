"""Validation of request fields. Every field is treated as hostile.

Rules come from the CSI spec's size limits (strings <= 128 bytes, maps <= 4 KiB),
its CreateVolume name rule (any Unicode except the listed control ranges),
and from incidents in other drivers (see the security notes): parameters and
mount flags are allow-lists, and nothing from a request is ever pasted into a
command line or a path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from csi import DRIVER_NAME
from csi.backend.base import check_values
from csi.errors import InvalidArgument, OutOfRange
from csi.model import CREATED_BY, DEFAULT_FS, MIN_FS_BYTES, SUPPORTED_FS, AccessType, Capability, Mode, round_up
from csi.v1 import csi_pb2

NAME_MAX_BYTES = 128
MAP_MAX_BYTES = 4096
GiB = 1024**3

_FORBIDDEN = frozenset([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)])

FSTYPE_KEY = "csi.storage.k8s.io/fstype"
#: Keys any StorageClass may carry, beyond the backend's own (its
#: ``Parameters``): the fstype, and the metadata csi-provisioner adds with
#: --extra-create-metadata (informational only, so any value).
COMMON: Mapping[str, frozenset[str] | None] = {
    FSTYPE_KEY: frozenset(SUPPORTED_FS),
    "csi.storage.k8s.io/pvc/name": None,
    "csi.storage.k8s.io/pvc/namespace": None,
    "csi.storage.k8s.io/pv/name": None,
    CREATED_BY: frozenset({"docker-plugin"}),
}
#: Common keys recorded with the volume (and so part of a retry's identity),
#: although no backend gives them a meaning: which tool made it.
RECORDED = frozenset({CREATED_BY})
#: Keys a VolumeSnapshotClass may carry: csi-snapshotter's metadata only.
SNAPSHOT: Mapping[str, frozenset[str] | None] = {
    "csi.storage.k8s.io/volumesnapshot/name": None,
    "csi.storage.k8s.io/volumesnapshot/namespace": None,
    "csi.storage.k8s.io/volumesnapshotcontent/name": None,
}
#: Keys a VolumeGroupSnapshotClass may carry: the group metadata
#: csi-snapshotter adds with --extra-create-metadata.
GROUP_SNAPSHOT: Mapping[str, frozenset[str] | None] = {
    "csi.storage.k8s.io/volumegroupsnapshot/name": None,
    "csi.storage.k8s.io/volumegroupsnapshot/namespace": None,
    "csi.storage.k8s.io/volumegroupsnapshotcontent/name": None,
}


#: The namespace of every backend's own parameter keys.
BACKEND_KEY_PREFIX = f"{DRIVER_NAME}/"


def foreign_keys(params: Mapping[str, str], own: Mapping[str, frozenset[str] | None]) -> list[str]:
    """Keys of ELV's own namespace that this backend does not declare: the
    parameters are for another backend (an LVM class on a loop node, or the
    other way round). Keys outside the namespace are typos, not foreign."""
    return sorted(k for k in params if k.startswith(BACKEND_KEY_PREFIX) and k not in own)


MULTI_NODE = frozenset(
    {
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_READER_ONLY,
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_SINGLE_WRITER,
        csi_pb2.VolumeCapability.AccessMode.MULTI_NODE_MULTI_WRITER,
    }
)

#: Mount flags a capability may ask for, as exact strings. An entry with "="
#: is allowed only exactly as written, so "data=ordered,dev=..." and other
#: comma or option injections (CVE-2026-6437) cannot get through.
MOUNT_FLAGS = frozenset(
    {"ro", "rw", "noatime", "nodiratime", "relatime", "strictatime", "lazytime", "nodev", "noexec", "nosuid"}
    | {"sync", "dirsync", "discard", "nodiscard", "nobarrier", "data=ordered", "data=writeback", "data=journal"}
    | {"errors=remount-ro", "errors=continue", "inode64", "largeio", "noquota"}
)


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def name(value: str, field: str = "name") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if _utf8_len(value) > NAME_MAX_BYTES:
        raise InvalidArgument(f"{field} is longer than {NAME_MAX_BYTES} bytes")
    bad = [c for c in value if ord(c) in _FORBIDDEN or 0xD800 <= ord(c) <= 0xDFFF]
    if bad:
        raise InvalidArgument(f"{field} contains a forbidden control character (U+{ord(bad[0]):04X})")
    return value


def required_id(value: str, field: str) -> str:
    """An ID must be present and short; its *format* is the backend's to judge,
    and a well-formed-but-unknown ID is NOT_FOUND (or OK for deletes)."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    if _utf8_len(value) > NAME_MAX_BYTES or "\x00" in value:
        raise InvalidArgument(f"{field} is not a valid ID")
    return value


def string_map(m: Mapping[str, str], field: str) -> None:
    total = sum(_utf8_len(k) + _utf8_len(v) for k, v in m.items())
    if total > MAP_MAX_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAP_MAX_BYTES} bytes")
    for k, v in m.items():
        if "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"{field} contains a NUL byte")


def parameters(
    params: Mapping[str, str], allowed: Mapping[str, frozenset[str] | None], field: str = "parameters"
) -> dict[str, str]:
    """Check a parameter map against a declaration: each key must be declared,
    and a key with a closed value set must have one of its values."""
    string_map(params, field)
    unknown = sorted(k for k in params if k not in allowed)
    if unknown:
        raise InvalidArgument(f"unknown {field} key {unknown[0]!r}; allowed keys: {', '.join(sorted(allowed))}")
    check_values(params, allowed, field)
    return dict(params)


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why ELV cannot serve this capability, or None if it can."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "volume_capability needs an access type (block or mount)"
    mode = cap.access_mode.mode
    if mode in MULTI_NODE:
        return "ELV volumes are local to one node: multi-node access modes are not supported; use a SINGLE_NODE_* mode (ReadWriteOnce or ReadWriteOncePod)"
    if mode not in Mode._value2member_map_:
        return "volume_capability.access_mode is missing or unknown"
    if kind == "mount":
        fs = cap.mount.fs_type or DEFAULT_FS
        if fs not in SUPPORTED_FS:
            return f"filesystem {cap.mount.fs_type!r} is not supported; use one of: {', '.join(SUPPORTED_FS)}"
        for flag in cap.mount.mount_flags:
            if flag not in MOUNT_FLAGS:
                return f"mount flag {flag!r} is not allowed; allowed flags: {', '.join(sorted(MOUNT_FLAGS))}"
        if cap.mount.volume_mount_group:
            return "volume_mount_group is not supported"
    return None


def capability(cap: csi_pb2.VolumeCapability, field: str = "volume_capability") -> Capability:
    problem = capability_problem(cap)
    if problem is not None:
        raise InvalidArgument(
            problem
            if problem.startswith(("volume_capability", "ELV", "filesystem", "mount flag"))
            else f"{field}: {problem}"
        )
    if cap.WhichOneof("access_type") == "block":
        return Capability(AccessType.BLOCK, Mode(cap.access_mode.mode), None, ())
    return Capability(
        AccessType.MOUNT,
        Mode(cap.access_mode.mode),
        cap.mount.fs_type or None,
        tuple(cap.mount.mount_flags),
    )


def capabilities(caps: Sequence[csi_pb2.VolumeCapability], field: str = "volume_capabilities") -> list[Capability]:
    if not caps:
        raise InvalidArgument(f"{field} is required")
    out = [capability(c, field) for c in caps]
    if len({c.access for c in out}) > 1:
        raise InvalidArgument(f"{field} mixes block and mount access types")
    if len({c.fs_type for c in out if c.fs_type}) > 1:
        raise InvalidArgument(f"{field} asks for more than one filesystem")
    return out


def size(
    cr: csi_pb2.CapacityRange | None,
    *,
    minimum: int,
    granularity: int,
    default: int = GiB,
) -> int:
    """The size to provision for a capacity range, per the spec: at least
    ``required_bytes``, at most ``limit_bytes``; either may be unset (0)."""
    required = cr.required_bytes if cr is not None else 0
    limit = cr.limit_bytes if cr is not None else 0
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range values must not be negative")
    if required and limit and limit < required:
        raise InvalidArgument("capacity_range.limit_bytes is smaller than required_bytes")
    if required:
        want = required
    elif limit:
        want = min(default, limit)
    else:
        want = default
    got = round_up(max(want, minimum), granularity)
    if limit and got > limit:
        # Rounding up overshot the limit; the largest multiple below it may still do.
        floor = limit - limit % granularity
        if floor > 0 and floor >= max(required, minimum):
            return floor
    if limit and got > limit:
        raise OutOfRange(f"cannot provision within limit_bytes={limit}: the smallest size possible here is {got} bytes")
    return got


def fs_minimum(fs_type: str | None) -> int:
    return MIN_FS_BYTES.get(fs_type or "", 0)
