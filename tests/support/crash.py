"""The crash world: an orchestrator that SIGKILLs ``elv serve`` at random
points in a stream of operations, restarts it and retries until each call
converges, and the volumes it keeps and checks (the loop crash test in
tests/reliability and the LVM one in tests/lvm both run it).

KILLS (ELV_CRASH_KILLS, default 200) and SEED (ELV_CRASH_SEED, random unless
given: it replays a run) are read here, once.

**Every counted kill lands inside a mutating RPC, and is proven to.** The
driver runs with ``--log-level debug``: it logs ``msg=request rpc=M`` when an
RPC enters it, ``msg="exec TOOL ..."`` as each command starts, and
``msg=rpc rpc=M code=...`` when the RPC ends (before the answer is sent). The
orchestrator waits for the start line, waits a random moment more, kills, and
then reads the dead driver's log: the kill counts only if the RPC had started
and not ended. Kills that missed (the RPC ended first) are retried on the next
operation and reported apart. Each counted kill is classified by the
operation and the phase it cut: the last command the RPC had started (mkfs,
copy, freeze, grow, an LVM command...) or ``in-process`` (metadata, mounts,
ioctls: the driver's own code). A backend's World may slow its tools down
through ``--tool-path`` wrappers (:func:`slow_tools`) so that kills land in
them as well as between them.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import shutil
import threading
import time
from dataclasses import dataclass, field

import grpc

from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support.driver import Driver, MiB
from tests.support.rpc import block_cap, mount_cap

KILLS = int(os.environ.get("ELV_CRASH_KILLS", "200"))
SEED = int(os.environ.get("ELV_CRASH_SEED", str(random.SystemRandom().randrange(1 << 32))))
STUBS = {
    "controller": csi_pb2_grpc.ControllerStub,
    "node": csi_pb2_grpc.NodeStub,
    "group": csi_pb2_grpc.GroupControllerStub,
}
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


@dataclass
class Vol:
    name: str
    vid: str
    fs: str | None  # None: raw block
    size: int
    staged: bool = False
    published: bool = False
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 (mount volumes)
    block_sum: str | None = None  # sha256 of the first 64 KiB (block volumes)


@dataclass
class Snap:
    name: str
    sid: str
    source: Vol
    files: dict[str, str]
    block_sum: str | None


#: The driver's arguments that the kill proof needs (see the module docstring).
DEBUG_LOG = ("--log-level", "debug")
#: Where a command's name says the RPC was (the last command it started).
PHASES = {
    "mkfs.ext4": "mkfs",
    "mkfs.xfs": "mkfs",
    "blkid": "probe",
    "cp": "copy",
    "fsfreeze": "freeze",
    "resize2fs": "grow",
    "xfs_growfs": "grow",
    "e2fsck": "fsck",
    "losetup": "losetup",
    "blkdiscard": "wipe",
    "dd": "copy",
}
OPS = {
    "CreateVolume": "create",
    "DeleteVolume": "delete",
    "NodeStageVolume": "stage",
    "NodeUnstageVolume": "unstage",
    "NodePublishVolume": "publish",
    "NodeUnpublishVolume": "unpublish",
    "ControllerExpandVolume": "expand",
    "NodeExpandVolume": "node-expand",
    "CreateSnapshot": "snapshot",
    "DeleteSnapshot": "delete-snapshot",
}
# "exec": a command of its own; "shell": one a resident lvm shell ran.
_EXEC = re.compile(r'msg="(?:exec|shell) (\S+) ?(\S*)')


def slow_tools(directory: str, tools: list[str], max_ms: int = 120) -> str:
    """Wrappers for ``--tool-path`` that wait 0..max_ms ms, then exec the real
    tool (same pid: the driver's journal of running commands still names it);
    returns the tool path. A kill then often lands while a command runs, and
    the command outlives the driver, as it would in production."""
    os.makedirs(directory, exist_ok=True)
    safe = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for name in tools:
        real = shutil.which(name, path=safe)
        assert real, f"{name} is not installed"
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(
                "#!/bin/sh\n"
                f"ms=$(( $(od -An -N2 -tu2 /dev/urandom) % {max_ms + 1} ))\n"
                'sleep "$((ms / 1000)).$(printf %03d $((ms % 1000)))"\n'
                f'exec {real} "$@"\n'
            )
        os.chmod(path, 0o755)
    return f"{directory}:{safe}"


def cut_phase(method: str, req: object, text: str) -> str:
    """operation/phase of a kill, from the RPC's log lines before it."""
    op = OPS.get(method, method)
    if method == "CreateVolume" and req.HasField("volume_content_source"):  # type: ignore[attr-defined]
        op = "clone"
    tools = [(os.path.basename(t), sub) for t, sub in _EXEC.findall(text)]
    if not tools:
        return f"{op}/in-process"
    last, sub = tools[-1]
    if last == "lvm":  # lvm lvcreate ...: the LVM command is the phase
        return f"{op}/{sub}"
    return f"{op}/{PHASES.get(last, last)}"


class Orchestrator:
    """Issues each RPC; on a kill, restarts the driver and retries the same
    request until it succeeds, the way csi-provisioner and kubelet do."""

    def __init__(self, driver: Driver, rng: random.Random, kill_window: float = 0.04) -> None:
        self.d = driver
        self.rng = rng
        self.kills = 0  # proven to have landed inside a mutating RPC
        self.missed = 0  # the RPC had ended (or never started) when the kill landed
        self.cut: collections.Counter[str] = collections.Counter()  # op/phase -> counted kills
        self.ops = 0
        self.restart_seconds = 0.0  # from the kill until the new driver answers Probe
        # How far into an RPC the kill may land: a loop RPC takes milliseconds,
        # an LVM one (in the emulated guest) about a second.
        self.kill_window = kill_window

    def call(self, method: str, stub_name: str, req: object, kill: bool) -> object:
        self.ops += 1
        if kill:
            result: list[object] = []
            # The doomed call gets a channel and stub of its own, made here:
            # the kill closes the driver's shared channel, and grpc-python
            # crashed (SIGSEGV) when one thread built a stub on a channel
            # another thread was closing.
            channel = grpc.insecure_channel(self.d.endpoint)
            # Connected before the clock starts, so the kill window measures
            # time inside the RPC, not the connect.
            grpc.channel_ready_future(channel).result(timeout=30)
            rpc = getattr(STUBS[stub_name](channel), method)

            def first() -> None:
                try:
                    result.append(rpc(req, timeout=60))
                except grpc.RpcError as e:
                    result.append(e)

            offset = self._log_size()
            t = threading.Thread(target=first)
            t.start()
            started = self._wait_start(method, offset, t)
            if started and self.rng.random() < 0.5:
                # Most RPCs end within milliseconds of entering: kill at once
                # (0.5 ms after the start line, the poll's step) as often as
                # a moment later, when the slow ones are inside their tools.
                time.sleep(self.rng.uniform(0, self.kill_window))
            t0 = time.monotonic()
            self.d.kill()
            self._count(method, req, offset, started)
            t.join(60)
            channel.close()  # only once its call has ended
            self.d.start()
            self.restart_seconds += time.monotonic() - t0
        for _ in range(200):
            try:
                return getattr(getattr(self.d, stub_name), method)(req, timeout=60)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise AssertionError(
                        f"{method} failed with {e.code().name}: {e.details()}\n{self.d.log()[-3000:]}"
                    ) from e
                time.sleep(0.05)
        raise AssertionError(f"{method} never converged")

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.d.log_path)
        except FileNotFoundError:
            return 0

    def _since(self, offset: int) -> str:
        with open(self.d.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def _wait_start(self, method: str, offset: int, t: threading.Thread) -> bool:
        """Until the driver logs that the RPC entered it (or the call ended)."""
        line = f"msg=request rpc={method} "
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if line in self._since(offset):
                return True
            if not t.is_alive():
                return False
            time.sleep(0.0005)
        return False

    def _count(self, method: str, req: object, offset: int, started: bool) -> None:
        """Read the killed driver's last lines: count the kill if it cut the RPC."""
        text = self._since(offset)
        begin = text.find(f"msg=request rpc={method} ")
        ended = re.search(rf"msg=rpc rpc={method} code=", text[begin:]) if begin >= 0 else None
        if not started or begin < 0 or ended is not None:
            self.missed += 1
            return
        self.kills += 1
        self.cut[cut_phase(method, req, text[begin:])] += 1

    def cut_report(self) -> str:
        """The counted kills by operation/phase, most first."""
        return " ".join(f"{k}={n}" for k, n in sorted(self.cut.items(), key=lambda kv: (-kv[1], kv[0])))


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class World:
    kill_window = 0.04

    def __init__(self, d: Driver, seed: int) -> None:
        self.d = d
        self.rng = random.Random(seed)
        self.o = Orchestrator(d, self.rng, self.kill_window)
        self.vols: list[Vol] = []
        self.snaps: list[Snap] = []
        self.n = 0

    def staging(self, v: Vol) -> str:
        return self.d.path("staging", v.name)

    def target(self, v: Vol) -> str:
        return self.d.path("pods", v.name, "t")

    def cap(self, v: Vol) -> csi_pb2.VolumeCapability:
        return block_cap() if v.fs is None else mount_cap(v.fs)

    def kill(self) -> bool:
        return self.rng.random() < 0.6

    def parameters(self, source: Snap | None, fs: str | None) -> dict[str, str]:
        """StorageClass parameters of a new volume (a backend's World may vary them)."""
        return {}

    def may_expand(self, v: Vol) -> bool:
        return True

    # -- operations -----------------------------------------------------------

    def create(self, source: Snap | None = None) -> None:
        self.n += 1
        if source is not None:
            fs, size = source.source.fs, source.source.size
        else:
            fs = self.rng.choice(["ext4", "ext4", "xfs", None])
            size = (300 if fs == "xfs" else self.rng.choice([32, 48, 64])) * MiB
        v = Vol(f"crash-{self.n}", "", fs, size)
        req = csi_pb2.CreateVolumeRequest(
            name=v.name,
            volume_capabilities=[self.cap(v)],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            parameters=self.parameters(source, fs),
        )
        if source is not None:
            req.volume_content_source.snapshot.snapshot_id = source.sid
            v.files, v.block_sum = dict(source.files), source.block_sum
        resp = self.o.call("CreateVolume", "controller", req, self.kill())
        v.vid = resp.volume.volume_id  # type: ignore[attr-defined]
        self.vols.append(v)

    def stage(self, v: Vol) -> None:
        os.makedirs(self.staging(v), exist_ok=True)
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=v.vid, staging_target_path=self.staging(v), volume_capability=self.cap(v)
        )
        self.o.call("NodeStageVolume", "node", req, self.kill())
        v.staged = True

    def publish(self, v: Vol) -> None:
        os.makedirs(os.path.dirname(self.target(v)), exist_ok=True)
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=v.vid,
            staging_target_path=self.staging(v),
            target_path=self.target(v),
            volume_capability=self.cap(v),
        )
        self.o.call("NodePublishVolume", "node", req, self.kill())
        v.published = True

    def write(self, v: Vol) -> None:
        data = self.rng.randbytes(self.rng.randrange(1, 256 * 1024))
        if v.fs is None:
            fd = os.open(self.target(v), os.O_WRONLY)
            try:
                os.pwrite(fd, data[: 64 * 1024].ljust(64 * 1024, b"\0"), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            v.block_sum = hashlib.sha256(data[: 64 * 1024].ljust(64 * 1024, b"\0")).hexdigest()
            return
        name = f"f{len(v.files)}"
        path = os.path.join(self.target(v), name)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        v.files[name] = hashlib.sha256(data).hexdigest()

    def unpublish(self, v: Vol) -> None:
        req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=v.vid, target_path=self.target(v))
        self.o.call("NodeUnpublishVolume", "node", req, self.kill())
        v.published = False

    def unstage(self, v: Vol) -> None:
        req = csi_pb2.NodeUnstageVolumeRequest(volume_id=v.vid, staging_target_path=self.staging(v))
        self.o.call("NodeUnstageVolume", "node", req, self.kill())
        v.staged = False

    def delete(self, v: Vol) -> None:
        self.o.call("DeleteVolume", "controller", csi_pb2.DeleteVolumeRequest(volume_id=v.vid), self.kill())
        self.vols.remove(v)

    def expand(self, v: Vol) -> None:
        new = v.size + 16 * MiB
        rng = csi_pb2.CapacityRange(required_bytes=new)
        req = csi_pb2.ControllerExpandVolumeRequest(volume_id=v.vid, capacity_range=rng)
        self.o.call("ControllerExpandVolume", "controller", req, self.kill())
        v.size = new
        if v.published and v.fs != "ext4":  # ext4 grows offline at the next stage on this machine
            nreq = csi_pb2.NodeExpandVolumeRequest(volume_id=v.vid, volume_path=self.target(v), capacity_range=rng)
            self.o.call("NodeExpandVolume", "node", nreq, self.kill())

    def snapshot(self, v: Vol) -> None:
        self.n += 1
        req = csi_pb2.CreateSnapshotRequest(name=f"crash-snap-{self.n}", source_volume_id=v.vid)
        resp = self.o.call("CreateSnapshot", "controller", req, self.kill())
        sid = resp.snapshot.snapshot_id  # type: ignore[attr-defined]
        self.snaps.append(Snap(req.name, sid, v, dict(v.files), v.block_sum))

    def delete_snapshot(self, s: Snap) -> None:
        self.o.call("DeleteSnapshot", "controller", csi_pb2.DeleteSnapshotRequest(snapshot_id=s.sid), self.kill())
        self.snaps.remove(s)

    # -- checks -------------------------------------------------------------------

    def verify(self) -> None:
        for v in self.vols:
            if not v.published:
                continue
            if v.fs is None:
                if v.block_sum is not None:
                    with open(self.target(v), "rb") as f:
                        assert hashlib.sha256(f.read(64 * 1024)).hexdigest() == v.block_sum, (
                            f"{v.name}: block data changed"
                        )
                continue
            present = sorted(n for n in os.listdir(self.target(v)) if n != "lost+found")
            assert present == sorted(v.files), f"{v.name}: files {present} != {sorted(v.files)}"
            for name, digest in v.files.items():
                assert sha(os.path.join(self.target(v), name)) == digest, f"{v.name}/{name}: checksum changed"
        listed = {e.volume.volume_id for e in self.d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries}
        assert listed == {v.vid for v in self.vols}, "a volume was lost or leaked"

    def step(self) -> None:
        choices: list[tuple[str, object]] = []
        if len(self.vols) < 5:
            choices.append(("create", None))
        if self.snaps and len(self.vols) < 6:
            choices.append(("clone", self.rng.choice(self.snaps)))
        for v in self.vols:
            grow = [("expand", v)] if self.may_expand(v) else []
            if not v.staged:
                choices += [("stage", v), ("delete", v), *grow]
            elif not v.published:
                choices += [("publish", v), ("unstage", v)]
            else:
                choices += [("write", v), ("write", v), ("unpublish", v), ("snapshot", v), *grow]
        for s in self.snaps:
            choices.append(("delete_snapshot", s))
        op, arg = self.rng.choice(choices)
        if op == "create":
            self.create()
        elif op == "clone":
            self.create(arg)  # type: ignore[arg-type]
        else:
            getattr(self, op)(arg)

    def restage_all(self) -> None:
        """Unpublish, unstage, stage and publish every volume: clones and
        restored data must survive a full restage."""
        for v in list(self.vols):
            if v.published:
                self.unpublish(v)
            if v.staged:
                self.unstage(v)
            self.stage(v)
            self.publish(v)

    def report(self, label: str, seconds: float, out: str, extra: str = "") -> None:
        """The run's figures in one line, printed and written to ci-out/OUT (scripts/test prints it)."""
        line = (
            f"{label}: seed={SEED} kills={self.o.kills} (each inside a mutating RPC; {self.o.missed} more missed) "
            f"operations={self.o.ops} seconds={seconds:.0f} restarts={self.o.restart_seconds:.0f}s{extra}\n"
            f"  kills by operation/phase: {self.o.cut_report()}"
        )
        print(line)
        os.makedirs("ci-out", exist_ok=True)
        with open(os.path.join("ci-out", out), "w") as f:
            f.write(line + "\n")

    def teardown(self) -> None:
        for v in list(self.vols):
            if v.published:
                self.unpublish(v)
            if v.staged:
                self.unstage(v)
            self.delete(v)
        for s in list(self.snaps):
            self.delete_snapshot(s)
