"""``elv attach`` / ``elv detach``: hot-plug a volume into a running process's
mount namespace (a container from docker, podman or containerd, or a plain
``unshare -m``).

Through CSI, the volume is staged and published to a host-side anchor under
the driver's plugin directory, one per target namespace and path
(``<kubelet-dir>/plugins/<driver>/attach/<volume>/ns-<inode>-<path hash>``). The anchor
is what the driver sees, so it refuses to unstage or delete an attached
volume. A detached copy of the anchor is then moved into the namespace at
the requested path (csi.host.nsmount); the path itself is never mounted on
the host.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys

from csi.cmd.client import Client, block_capability, mount_capability
from csi.cmd.common import CliError, call, find_volume, plugin
from csi.cmd.dockerplugin.state import plugin_dir
from csi.host.mountinfo import MountTable, parse
from csi.host.nsmount import idmap_tree, open_tree_clone, user_namespace
from csi.model import ACCESS_KEY, FS_KEY
from csi.v1 import csi_pb2


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser], endpoint: str) -> None:
    a = sub.add_parser("attach", help="mount a volume into a running process's mount namespace")
    a.add_argument("name")
    a.add_argument("--pid", type=int, required=True, help="any process in the target namespace")
    a.add_argument("--path", required=True, help="where the volume appears inside it, e.g. /data")
    a.add_argument("--readonly", action="store_true")
    a.add_argument(
        "--idmap",
        choices=["auto", "none"],
        default="auto",
        help="auto (default): an idmapped mount when the process is in another user namespace (a rootless "
        "container), so its root owns what uid 0 owns on disk; none: a plain mount",
    )
    a.add_argument("--endpoint", default=endpoint)
    d = sub.add_parser("detach", help="undo elv attach")
    d.add_argument("name")
    d.add_argument("--pid", type=int, required=True)
    d.add_argument("--path", default=None, help="default: every place the volume is mounted in that namespace")
    d.add_argument("--endpoint", default=endpoint)


def _ns_inode(pid: int) -> int:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except FileNotFoundError:
        raise CliError(f"no process with pid {pid}", "pass the pid of a process in the container") from None


async def _anchor_dir(client: Client, vid: str) -> str:
    info = await plugin(client)
    kubelet = info.manifest.get("kubelet-dir") or "/var/lib/kubelet"
    return os.path.join(kubelet, "plugins", info.name, "attach", vid)


def _anchor_name(inode: int, path: str) -> str:
    return f"ns-{inode}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def _capability(entry: csi_pb2.ListVolumesResponse.Entry) -> csi_pb2.VolumeCapability:
    ctx = entry.volume.volume_context
    if ctx.get(ACCESS_KEY) == "block":
        return block_capability()
    return mount_capability(ctx.get(FS_KEY) or "")


async def attachments(client: Client, vid: str) -> list[dict[str, object]]:
    """Where the volume is attached: one entry per namespace anchor."""
    base = await _anchor_dir(client, vid)
    out: list[dict[str, object]] = []
    for m in MountTable.load().under(os.path.realpath(base)):
        name = os.path.basename(m.mount_point)
        if name.startswith("ns-"):
            inode = int(name.split("-")[1])
            pids = [p for p in _pids() if _safe_inode(p) == inode]
            out.append({"namespace": inode, "pids": pids[:5]})
    return out


async def staged_path(client: Client, vid: str) -> str | None:
    """Where the volume is staged by ``elv attach`` or by a volume plugin, if it is."""
    info = await plugin(client)
    kubelet = info.manifest.get("kubelet-dir") or "/var/lib/kubelet"
    candidates = [os.path.join(await _anchor_dir(client, vid), "staging")]
    plugins = os.path.dirname(plugin_dir(kubelet, info.name, "x"))
    with contextlib.suppress(FileNotFoundError):
        candidates += [os.path.join(plugins, p, vid, "staging") for p in sorted(os.listdir(plugins))]
    table = MountTable.load()
    return next((c for c in candidates if table.top(os.path.realpath(c)) is not None), None)


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _safe_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def _helper(*args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "csi.host.nsmount", *args],
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def attach(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("elv attach needs root (it enters another mount namespace)", "run it with sudo")
    if not args.path.startswith("/") or os.path.normpath(args.path) != args.path or args.path == "/":
        raise CliError(f"--path {args.path!r} must be an absolute, normalised path other than /")
    inode = _ns_inode(args.pid)
    if inode == os.stat("/proc/self/ns/mnt").st_ino:
        raise CliError("that process shares the host's mount namespace", "attach to a process inside a container")
    async with Client(args.endpoint) as client:
        ep = client.endpoint
        entry = await find_volume(client, args.name)
        vid, cap = entry.volume.volume_id, _capability(entry)
        block = cap.HasField("block")
        base = await _anchor_dir(client, vid)
        staging, anchor = os.path.join(base, "staging"), os.path.join(base, _anchor_name(inode, args.path))
        if MountTable.load().top(os.path.realpath(anchor)) is not None:
            # Already attached at this path: a repeat is a no-op, never a second stacked mount.
            print(f"{args.name} is already attached at {args.path} in the mount namespace of pid {args.pid}")
            return 0
        os.makedirs(staging, mode=0o750, exist_ok=True)
        await call(
            ep,
            lambda: client.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=cap),
                timeout=600,
            ),
        )
        await call(
            ep,
            lambda: client.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid,
                    staging_target_path=staging,
                    target_path=anchor,
                    volume_capability=cap,
                    readonly=args.readonly,
                ),
                timeout=600,
            ),
        )
        idmapped = args.idmap == "auto" and not block and _other_user_namespace(args.pid)
        try:
            res = _move_in(anchor, args.pid, args.path, block, idmapped)
        except OSError as e:
            await _release(client, vid, staging, anchor)
            raise CliError(
                f"cannot make an idmapped mount for pid {args.pid}'s user namespace: {e.strerror}",
                "attach with --idmap none (the container then sees files it does not map as nobody)",
            ) from None
        if res.returncode != 0:
            await _release(client, vid, staging, anchor)
            raise CliError(f"cannot attach inside pid {args.pid}'s namespace: {res.stderr.strip()}")
    print(
        f"attached {args.name} at {args.path} in the mount namespace of pid {args.pid}"
        + (" (read-only)" if args.readonly else "")
        + (", idmapped to its user namespace" if idmapped else "")
    )
    return 0


def _other_user_namespace(pid: int) -> bool:
    """Whether ``pid`` lives in another user namespace than ours (the initial one, for root on the host)."""
    try:
        return user_namespace(pid) != user_namespace("self")
    except FileNotFoundError:
        raise CliError(f"no process with pid {pid}") from None


def _move_in(anchor: str, pid: int, path: str, block: bool, idmapped: bool) -> subprocess.CompletedProcess[str]:
    """A detached copy of the anchor (idmapped if asked), moved into pid's namespace by the helper."""
    fd = open_tree_clone(anchor)
    try:
        if idmapped:
            idmap_tree(fd, pid)
        argv = ["attach", "--pid", str(pid), "--path", path, "--fd", str(fd)] + (["--file"] if block else [])
        return _helper(*argv, pass_fds=(fd,))
    finally:
        os.close(fd)


async def _release(client: Client, vid: str, staging: str, anchor: str) -> None:
    """Unpublish the anchor, and unstage when no other namespace uses the volume."""
    ep = client.endpoint
    await call(
        ep,
        lambda: client.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=anchor), timeout=600
        ),
    )
    others = [
        m
        for m in MountTable.load().under(os.path.realpath(os.path.dirname(anchor)))
        if os.path.basename(m.mount_point).startswith("ns-")
    ]
    if not others:
        await call(
            ep,
            lambda: client.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging), timeout=600
            ),
        )


async def detach(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise CliError("elv detach needs root", "run it with sudo")
    inode = _ns_inode(args.pid)
    async with Client(args.endpoint) as client:
        entry = await find_volume(client, args.name)
        vid = entry.volume.volume_id
        base = await _anchor_dir(client, vid)
        staging = os.path.join(base, "staging")
        table = MountTable.load()
        if args.path:
            anchors = [os.path.join(base, _anchor_name(inode, args.path))]
        else:
            anchors = [
                m.mount_point
                for m in table.under(os.path.realpath(base))
                if os.path.basename(m.mount_point).startswith(f"ns-{inode}-")
            ]
        anchors = [a for a in anchors if table.top(os.path.realpath(a)) is not None]
        if not anchors:
            raise CliError(
                f"{args.name} is not attached to pid {args.pid}'s namespace" + (f" at {args.path}" if args.path else "")
            )
        host = table.top(os.path.realpath(anchors[0]))
        assert host is not None
        with open(f"/proc/{args.pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            theirs = MountTable(parse(f.read()))
        if args.path:
            paths = [args.path]
        elif host.fstype == "devtmpfs":
            paths = [m.mount_point for m in theirs.mounts if m.fstype == "devtmpfs" and m.root == host.root]
        else:
            paths = [m.mount_point for m in theirs.of_device(host.major, host.minor)]
        for path in paths:
            res = _helper("detach", "--pid", str(args.pid), "--path", path, "--dev", f"{host.major}:{host.minor}")
            if res.returncode not in (0, 3):
                raise CliError(f"cannot unmount {path} inside pid {args.pid}'s namespace: {res.stderr.strip()}")
        for anchor in anchors:
            await _release(client, vid, staging, anchor)
    print(f"detached {args.name} from the mount namespace of pid {args.pid}")
    return 0
