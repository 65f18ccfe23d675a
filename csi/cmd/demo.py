"""``elv demo``: one volume's whole life, driven through the driver's socket.

create, stage, publish, write, expand online, snapshot, clone from the
snapshot (the file is there), then unpublish, unstage and delete everything,
printing each step with its duration. It cleans up even when a step fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from csi.cmd.client import Client, mount_capability
from csi.host import loop as loopdev
from csi.host import scratch
from csi.host.mountinfo import MountTable
from csi.v1 import csi_pb2

T = TypeVar("T")
MiB = 1024 * 1024


class Demo:
    def __init__(self, client: Client, workdir: str, out: Callable[[str], None] = print) -> None:
        self.c = client
        self.work = workdir
        self.out = out
        self.cleanup: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        self.step_no = 0

    async def step(self, title: str, fn: Callable[[], Awaitable[T]]) -> T:
        self.step_no += 1
        t0 = time.monotonic()
        result = await fn()
        ms = (time.monotonic() - t0) * 1000
        self.out(f"  {self.step_no:2d}. {title:<52} {ms:8.1f} ms")
        return result

    def undo(self, what: str, fn: Callable[[], Awaitable[object]]) -> None:
        self.cleanup.append((what, fn))

    def forget(self, what: str) -> None:
        self.cleanup = [(w, f) for w, f in self.cleanup if w != what]

    async def teardown(self) -> None:
        for what, fn in reversed(self.cleanup):
            try:
                await fn()
            except Exception as e:  # keep going: leave as little as possible behind
                self.out(f"  cleanup of {what} failed: {e}")
        self.cleanup.clear()

    async def run(self) -> None:
        c = self.c
        tag = secrets.token_hex(3)
        cap = mount_capability("xfs")  # xfs grows online without CAP_SYS_RESOURCE
        staging = os.path.join(self.work, "staging", "vol")
        target = os.path.join(self.work, "pods", "demo", "data")
        clone_staging = os.path.join(self.work, "staging", "clone")
        clone_target = os.path.join(self.work, "pods", "demo", "restored")
        for d in (staging, clone_staging):
            os.makedirs(d, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)

        info = await c.wait_ready()
        self.out(f"ELV demo: driver {info.name} {info.vendor_version} on {c.endpoint}")

        vol = await self.step(
            "CreateVolume 512 MiB xfs",
            lambda: c.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name=f"demo-{tag}",
                    volume_capabilities=[cap],
                    capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB),
                )
            ),
        )
        vid = vol.volume.volume_id
        self.undo("volume", lambda: c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid)))
        self.undo(
            "stage",
            lambda: c.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging)
            ),
        )
        await self.step(
            "NodeStageVolume (attach loop, mkfs, mount)",
            lambda: c.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=cap)
            ),
        )
        self.undo(
            "publish",
            lambda: c.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)),
        )
        await self.step(
            "NodePublishVolume (bind mount)",
            lambda: c.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap
                )
            ),
        )

        payload = f"hello from ELV {tag}\n"

        async def write() -> None:
            def _w() -> None:
                with open(os.path.join(target, "hello.txt"), "w", encoding="utf-8") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())

            await asyncio.to_thread(_w)

        await self.step("write hello.txt into the volume", write)
        before = shutil.disk_usage(target).total

        async def expand() -> None:
            await c.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(
                    volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=1024 * MiB)
                )
            )
            await c.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(
                    volume_id=vid,
                    volume_path=target,
                    staging_target_path=staging,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=1024 * MiB),
                )
            )

        await self.step("expand online to 1 GiB (controller + node)", expand)
        after = shutil.disk_usage(target).total
        self.out(f"      filesystem size while mounted: {before / MiB:.0f} MiB -> {after / MiB:.0f} MiB")

        snap = await self.step(
            "CreateSnapshot (fsfreeze + copy)",
            lambda: c.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name=f"demo-snap-{tag}", source_volume_id=vid)
            ),
        )
        sid = snap.snapshot.snapshot_id
        self.undo("snapshot", lambda: c.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid)))

        src = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid))
        clone = await self.step(
            "CreateVolume from the snapshot (clone)",
            lambda: c.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name=f"demo-clone-{tag}",
                    volume_capabilities=[cap],
                    volume_content_source=src,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=1024 * MiB),
                )
            ),
        )
        cid = clone.volume.volume_id
        self.undo("clone", lambda: c.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=cid)))
        self.undo(
            "clone-stage",
            lambda: c.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=cid, staging_target_path=clone_staging)
            ),
        )
        self.undo(
            "clone-publish",
            lambda: c.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=cid, target_path=clone_target)
            ),
        )
        await self.step("stage + publish the clone", lambda: self._stage_publish(cid, clone_staging, clone_target, cap))
        with open(os.path.join(clone_target, "hello.txt"), encoding="utf-8") as f:
            got = f.read()
        if got != payload:
            raise RuntimeError(f"the clone holds {got!r}, expected {payload!r}")
        self.out(f"      the clone holds hello.txt: {got.strip()!r}")

        for what, title in (
            ("clone-publish", "NodeUnpublishVolume (clone)"),
            ("clone-stage", "NodeUnstageVolume (clone)"),
            ("clone", "DeleteVolume (clone)"),
            ("publish", "NodeUnpublishVolume"),
            ("stage", "NodeUnstageVolume (unmount, detach loop)"),
            ("snapshot", "DeleteSnapshot"),
            ("volume", "DeleteVolume"),
        ):
            fn = dict(self.cleanup)[what]
            await self.step(title, fn)
            self.forget(what)

    async def _stage_publish(self, vid: str, staging: str, target: str, cap: csi_pb2.VolumeCapability) -> None:
        await self.c.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(volume_id=vid, staging_target_path=staging, volume_capability=cap)
        )
        await self.c.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap
            )
        )


def leftovers(workdir: str, pool: str | None) -> list[str]:
    """Mounts under the demo's directory and loop devices on the pool."""
    found = [f"mount {m.mount_point}" for m in MountTable.load().under(os.path.realpath(workdir))]
    if pool:
        root = os.path.realpath(pool) + "/"
        found += [
            f"loop device {d.path} on {d.backing_file}" for d in loopdev.scan() if d.backing_file.startswith(root)
        ]
    return found


@contextlib.asynccontextmanager
async def spawned_server(base: str, log_path: str) -> AsyncIterator[str]:
    """Start ``elv serve`` on the loop backend in ``base``, logging to
    ``log_path``; yield its endpoint."""
    sock = os.path.join(base, "csi.sock")
    argv = [sys.executable, "-m", "csi", "serve", "--backend", "loop", "--loop-dir", os.path.join(base, "pool")]
    argv += ["--node-id", "demo-node", "--endpoint", "unix://" + sock, "--kubelet-dir", os.path.join(base, "kubelet")]
    argv += ["--state-dir", os.path.join(base, "run")]
    os.makedirs(os.path.join(base, "kubelet"), exist_ok=True)
    with open(log_path, "ab") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL)
    try:
        yield "unix://" + sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(cannot read it: {e.strerror})\n"


def _failure(e: Exception) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.details()} ({e.code().name})"
    return str(e) or type(e).__name__


async def main(endpoint: str | None, kubelet_dir: str, pool: str | None) -> int:
    """Run the demo; only its table goes to stdout. The driver it starts logs to
    a file (its path is printed), shown in part only if a step fails."""
    base = scratch.make("demo")
    log_path = None
    try:
        async with contextlib.AsyncExitStack() as stack:
            if endpoint is None:
                fd, log_path = tempfile.mkstemp(prefix="elv-demo-", suffix=".log")
                os.close(fd)
                endpoint = await stack.enter_async_context(spawned_server(base, log_path))
                kubelet_dir = os.path.join(base, "kubelet")
                pool = os.path.join(base, "pool")
            workdir = tempfile.mkdtemp(prefix="elv-demo-", dir=kubelet_dir)
            client = await stack.enter_async_context(Client(endpoint))
            demo = Demo(client, workdir)
            t0 = time.monotonic()
            try:
                await demo.run()
            except Exception as e:
                print(f"demo failed: {_failure(e)}", file=sys.stderr)
                await demo.teardown()
                if log_path:
                    print(f"the driver's log ({log_path}) ends with:\n{tail(log_path)}", end="", file=sys.stderr)
                return 1
            finally:
                left = leftovers(workdir, pool)
                if not left:  # never rmtree through a mount that is still there
                    shutil.rmtree(workdir, ignore_errors=True)
            print(f"ELV demo: done in {time.monotonic() - t0:.2f} s; left behind: {', '.join(left) or 'nothing'}")
            if log_path:
                print(f"the driver's log: {log_path}")
            return 1 if left else 0
    finally:
        if not MountTable.load().under(os.path.realpath(base)):
            shutil.rmtree(base, ignore_errors=True)
