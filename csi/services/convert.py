"""Model objects to CSI messages and back. Pure functions."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from csi.errors import InvalidArgument
from csi.model import ACCESS_KEY, CREATED_BY, FS_KEY, NAME_KEY, Snapshot, Source, Volume
from csi.v1 import csi_pb2


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def volume(v: Volume, topology: dict[str, str]) -> csi_pb2.Volume:
    # The name rides along in volume_context so that tools (elv volume list)
    # can show it; the driver itself never trusts volume_context.
    msg = csi_pb2.Volume(
        volume_id=v.id,
        capacity_bytes=v.size,
        accessible_topology=[csi_pb2.Topology(segments=topology)],
        volume_context={NAME_KEY: v.name, ACCESS_KEY: v.access.value, FS_KEY: v.formatted or v.fs_type or ""},
    )
    if CREATED_BY in v.parameters:
        msg.volume_context[CREATED_BY] = v.parameters[CREATED_BY]
    if v.source is not None:
        if v.source.kind == "snapshot":
            msg.content_source.snapshot.snapshot_id = v.source.id
        else:
            msg.content_source.volume.volume_id = v.source.id
    return msg


def snapshot(s: Snapshot) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        snapshot_id=s.id,
        source_volume_id=s.source_volume_id,
        size_bytes=s.size,
        creation_time=timestamp(s.created_ns),
        ready_to_use=s.ready,
        group_snapshot_id=s.group_id or "",
    )


def content_source(src: csi_pb2.VolumeContentSource) -> Source | None:
    kind = src.WhichOneof("type")
    if kind is None:
        return None
    if kind == "snapshot":
        if not src.snapshot.snapshot_id:
            raise InvalidArgument("volume_content_source.snapshot.snapshot_id is required")
        return Source("snapshot", src.snapshot.snapshot_id)
    if not src.volume.volume_id:
        raise InvalidArgument("volume_content_source.volume.volume_id is required")
    return Source("volume", src.volume.volume_id)
