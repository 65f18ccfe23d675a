"""``elv volume create|list|show|expand|snapshot|clone|delete``."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Awaitable, Callable

from csi.cmd import attach
from csi.cmd.client import Client, block_capability, mount_capability
from csi.cmd.common import (
    CliError,
    all_volumes,
    call,
    emit_json,
    find_snapshot,
    find_volume,
    human,
    parse_size,
    table,
    volume_name,
    with_progress,
)
from csi.model import ACCESS_KEY, DEVICE_CLASS, FS_KEY, PROVISIONING
from csi.v1 import csi_pb2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], endpoint: str) -> None:
    vol = sub.add_parser(
        "volume", help="volumes without Kubernetes: create, list, show, expand, snapshot, clone, delete"
    )
    vsub = vol.add_subparsers(dest="verb", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--endpoint", default=endpoint, help="the driver's socket (env CSI_ENDPOINT)")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    c = common(vsub.add_parser("create", help="create a volume"))
    c.add_argument("name")
    c.add_argument("--size", required=True, help="e.g. 512Mi, 2Gi")
    c.add_argument("--fs", choices=["ext4", "xfs"], default="ext4")
    c.add_argument("--block", action="store_true", help="a raw block volume (no filesystem)")
    c.add_argument("--class", dest="device_class", default=None, help="LVM device class")
    c.add_argument("--thick", action="store_true", help="allocate all space now")
    src = c.add_mutually_exclusive_group()
    src.add_argument("--from-snapshot", default=None, metavar="SNAPSHOT")
    src.add_argument("--from-volume", default=None, metavar="VOLUME")
    common(vsub.add_parser("list", help="list volumes"))
    for verb, helptext in (("show", "show one volume"), ("delete", "delete a volume")):
        common(vsub.add_parser(verb, help=helptext)).add_argument("name")
    e = common(vsub.add_parser("expand", help="grow a volume (online if attached)"))
    e.add_argument("name")
    e.add_argument("--size", required=True)
    s = common(vsub.add_parser("snapshot", help="snapshot a volume"))
    s.add_argument("name")
    s.add_argument("snapshot")
    s.add_argument("--delete", action="store_true", help="delete the snapshot instead")
    k = common(vsub.add_parser("clone", help="clone a volume into a new one"))
    k.add_argument("name")
    k.add_argument("new_name")
    k.add_argument("--size", default=None, help="default: the source's size")


def _row(e: csi_pb2.ListVolumesResponse.Entry) -> dict[str, object]:
    v = e.volume
    return {
        "name": volume_name(v),
        "id": v.volume_id,
        "size": v.capacity_bytes,
        "access": v.volume_context.get(ACCESS_KEY, ""),
        "fs": v.volume_context.get(FS_KEY, ""),
        "source": v.content_source.snapshot.snapshot_id or v.content_source.volume.volume_id,
        "condition": "abnormal: " + e.status.volume_condition.message if e.status.volume_condition.abnormal else "ok",
    }


async def run(args: argparse.Namespace) -> int:
    async with Client(args.endpoint) as client:
        if args.verb == "list":
            return await _list(client, args)
        if args.verb == "create":
            return await _create(client, args)
        entry = await find_volume(client, args.name)
        verb = _VERBS.get(args.verb)
        if verb is None:
            raise CliError(f"unknown verb {args.verb}")
        return await verb(client, args, entry)


Entry = csi_pb2.ListVolumesResponse.Entry


async def _list(client: Client, args: argparse.Namespace) -> int:
    rows = [_row(e) for e in await all_volumes(client)]
    if args.json:
        emit_json(rows)
        return 0
    header = ["NAME", "SIZE", "ACCESS", "FS", "CONDITION", "ID"]
    cells = [
        [str(r["name"]), human(int(str(r["size"]))), str(r["access"]), str(r["fs"]), str(r["condition"]), str(r["id"])]
        for r in rows
    ]
    print(table(cells, header))
    return 0


async def _show(client: Client, args: argparse.Namespace, entry: Entry) -> int:
    vid = entry.volume.volume_id
    info = _row(entry)
    req = csi_pb2.ListSnapshotsRequest(source_volume_id=vid)
    snaps = await call(client.endpoint, lambda: client.controller.ListSnapshots(req, timeout=30))
    info["snapshots"] = [
        {
            "id": s.snapshot.snapshot_id,
            "size": s.snapshot.size_bytes,
            "created": s.snapshot.creation_time.ToDatetime(datetime.UTC).isoformat(),
        }
        for s in snaps.entries
    ]
    info["attached"] = await attach.attachments(client, vid)
    if args.json:
        emit_json(info)
        return 0
    for k, val in info.items():
        if isinstance(val, list):
            print(f"{k + ':':<11} {len(val) or 'none'}")
            for item in val:
                print("  - " + ", ".join(f"{ik}={iv}" for ik, iv in item.items()))
        else:
            print(f"{k + ':':<11} {human(int(str(val))) if k == 'size' else val or '-'}")
    return 0


async def _delete(client: Client, args: argparse.Namespace, entry: Entry) -> int:
    req = csi_pb2.DeleteVolumeRequest(volume_id=entry.volume.volume_id)
    await call(client.endpoint, lambda: client.controller.DeleteVolume(req, timeout=300))
    print(f"deleted volume {args.name}")
    return 0


async def _expand(client: Client, args: argparse.Namespace, entry: Entry) -> int:
    vid = entry.volume.volume_id
    wanted = csi_pb2.CapacityRange(required_bytes=parse_size(args.size))
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=vid, capacity_range=wanted)
    resp = await call(client.endpoint, lambda: client.controller.ControllerExpandVolume(req, timeout=300))
    staging = await attach.staged_path(client, vid)
    if staging and resp.node_expansion_required:
        node_req = csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=staging, capacity_range=wanted)
        await call(client.endpoint, lambda: client.node.NodeExpandVolume(node_req, timeout=600))
    print(f"volume {args.name} is now {human(resp.capacity_bytes)}" + (" (grown online)" if staging else ""))
    return 0


async def _snapshot(client: Client, args: argparse.Namespace, entry: Entry) -> int:
    ep = client.endpoint
    if args.delete:
        snap = await find_snapshot(client, args.snapshot)
        req = csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
        await call(ep, lambda: client.controller.DeleteSnapshot(req, timeout=300))
        print(f"deleted snapshot {args.snapshot}")
        return 0
    create = csi_pb2.CreateSnapshotRequest(name=args.snapshot, source_volume_id=entry.volume.volume_id)
    work = call(ep, lambda: client.controller.CreateSnapshot(create, timeout=3600))
    made = (await with_progress(f"snapshotting {args.name}", work)).snapshot
    print(f"created snapshot {args.snapshot} ({made.snapshot_id}) of {args.name}")
    return 0


async def _clone(client: Client, args: argparse.Namespace, entry: Entry) -> int:
    context = entry.volume.volume_context
    cargs = argparse.Namespace(
        **{
            **vars(args),
            "name": args.new_name,
            "from_volume": entry.volume.volume_id,
            "from_snapshot": None,
            "size": args.size or str(entry.volume.capacity_bytes),
            "thick": False,
            "device_class": None,
            "block": context.get(ACCESS_KEY) == "block",
            "fs": context.get(FS_KEY) or "ext4",
        }
    )
    return await _create(client, cargs)


#: The verbs that act on one existing volume.
_VERBS: dict[str, Callable[[Client, argparse.Namespace, Entry], Awaitable[int]]] = {
    "show": _show,
    "delete": _delete,
    "expand": _expand,
    "snapshot": _snapshot,
    "clone": _clone,
}


async def _create(client: Client, args: argparse.Namespace) -> int:
    cap = block_capability() if args.block else mount_capability(args.fs)
    params: dict[str, str] = {}
    if args.device_class:
        params[DEVICE_CLASS] = args.device_class
    if args.thick:
        params[PROVISIONING] = "thick"
    req = csi_pb2.CreateVolumeRequest(
        name=args.name,
        volume_capabilities=[cap],
        parameters=params,
        capacity_range=csi_pb2.CapacityRange(required_bytes=parse_size(args.size)),
    )
    if args.from_snapshot:
        req.volume_content_source.snapshot.snapshot_id = (await find_snapshot(client, args.from_snapshot)).snapshot_id
    elif args.from_volume:
        req.volume_content_source.volume.volume_id = (await find_volume(client, args.from_volume)).volume.volume_id
    what = f"creating {args.name}" + (" (copying)" if req.HasField("volume_content_source") else "")
    vol = (
        await with_progress(what, call(client.endpoint, lambda: client.controller.CreateVolume(req, timeout=3600)))
    ).volume
    if args.json:
        emit_json({"name": args.name, "id": vol.volume_id, "size": vol.capacity_bytes})
    else:
        print(f"created volume {args.name} ({vol.volume_id}, {human(vol.capacity_bytes)})")
        print(f"attach it to a process with: elv attach {args.name} --pid PID --path /data", file=sys.stderr)
    return 0
