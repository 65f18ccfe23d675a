"""The benchmark's measurements. Each returns plain dicts of figures (seconds,
ratios, bytes), so the caller can print, save and plot them."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from csi.bench.harness import MiB, Target, pct
from csi.cmd.client import block_capability, mount_capability
from csi.model import PROVISIONING
from csi.v1 import csi_pb2

_names = itertools.count()


def uniq(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


class Volume:
    """One volume's life through a driver, timing each RPC."""

    def __init__(
        self,
        t: Target,
        fs: str | None,
        size: int,
        times: dict[str, list[float]] | None = None,
        parameters: dict[str, str] | None = None,
    ) -> None:
        self.t = t
        self.parameters = parameters or {}
        self.cap = block_capability() if fs is None else mount_capability(fs)
        self.size = size
        self.name = uniq("bench")
        self.vid = ""
        self.staging = os.path.join(t.kubelet, "st", self.name)
        self.target = os.path.join(t.kubelet, "pods", self.name, "vol")
        self.times = times if times is not None else {}

    async def _timed(self, op: str, coro: Any) -> Any:
        t0 = time.perf_counter()
        r = await coro
        self.times.setdefault(op, []).append(time.perf_counter() - t0)
        if self.t.on_rpc is not None:
            self.t.on_rpc(op)
        return r

    async def create(self, source: csi_pb2.VolumeContentSource | None = None, op: str = "CreateVolume") -> None:
        req = csi_pb2.CreateVolumeRequest(
            name=self.name,
            volume_capabilities=[self.cap],
            capacity_range=csi_pb2.CapacityRange(required_bytes=self.size),
            parameters=self.parameters,
        )
        if source is not None:
            req.volume_content_source.CopyFrom(source)
        self.vid = (await self._timed(op, self.t.controller.CreateVolume(req))).volume.volume_id

    async def stage(self, op: str = "NodeStageVolume") -> None:
        os.makedirs(self.staging, exist_ok=True)
        await self._timed(
            op,
            self.t.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=self.vid, staging_target_path=self.staging, volume_capability=self.cap
                )
            ),
        )

    async def publish(self) -> None:
        os.makedirs(os.path.dirname(self.target), exist_ok=True)
        await self._timed(
            "NodePublishVolume",
            self.t.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=self.vid,
                    staging_target_path=self.staging,
                    target_path=self.target,
                    volume_capability=self.cap,
                )
            ),
        )

    async def unpublish(self) -> None:
        await self._timed(
            "NodeUnpublishVolume",
            self.t.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=self.vid, target_path=self.target)
            ),
        )

    async def unstage(self) -> None:
        await self._timed(
            "NodeUnstageVolume",
            self.t.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(volume_id=self.vid, staging_target_path=self.staging)
            ),
        )

    async def delete(self) -> None:
        await self._timed(
            "DeleteVolume", self.t.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.vid))
        )

    async def delete_snapshot(self, snapshot_id: str) -> None:
        req = csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        await self._timed("DeleteSnapshot", self.t.controller.DeleteSnapshot(req))

    async def teardown(self) -> None:
        """Unpublish, unstage, delete: the end of every life."""
        await self.unpublish()
        await self.unstage()
        await self.delete()

    async def life(self) -> None:
        await self.create()
        await self.stage()
        await self.publish()
        await self.teardown()


def summary(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {op: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for op, v in times.items()}


async def latency(t: Target, n: int) -> dict[str, Any]:
    """p50/p99 of every RPC in a volume's life, for ext4 and xfs, plus
    expansion, snapshot and clone (xfs: it grows online without CAP_SYS_RESOURCE)."""
    out: dict[str, Any] = {}
    for fs, size in (("ext4", 64 * MiB), ("xfs", 320 * MiB)):
        times: dict[str, list[float]] = {}
        for _ in range(n):
            await Volume(t, fs, size, times).life()
        out[fs] = summary(times)
    times = {}
    for _ in range(n):
        v = Volume(t, "xfs", 320 * MiB, times)
        await v.create()
        await v.stage()
        await v.publish()
        with open(os.path.join(v.target, "data"), "wb") as f:
            f.write(os.urandom(4 * MiB))
        rng = csi_pb2.CapacityRange(required_bytes=448 * MiB)
        await v._timed(
            "ControllerExpandVolume",
            t.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(volume_id=v.vid, capacity_range=rng)
            ),
        )
        await v._timed(
            "NodeExpandVolume",
            t.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(volume_id=v.vid, volume_path=v.target, capacity_range=rng)
            ),
        )
        snap = await v._timed(
            "CreateSnapshot",
            t.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=v.vid)),
        )
        clone = Volume(t, "xfs", 448 * MiB, times)
        src = csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot.snapshot_id)
        )
        await clone.create(src, op="CreateVolume (clone)")
        await clone.delete()
        await v.delete_snapshot(snap.snapshot.snapshot_id)
        await v.teardown()
    out["xfs-extra"] = {
        k: val
        for k, val in summary(times).items()
        if k
        in ("ControllerExpandVolume", "NodeExpandVolume", "CreateSnapshot", "CreateVolume (clone)", "DeleteSnapshot")
    }
    return out


RAW_LIFE = r"""
set -e
f=$1/raw.img st=$1/raw-st tg=$1/raw-tg
mkdir -p $st $tg
for i in $(seq $2); do
  truncate -s 64M $f
  dev=$(losetup --find --show --direct-io=on --sector-size 4096 $f)
  mkfs.ext4 -q -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 $dev
  mount $dev $st
  mount --bind $st $tg
  umount $tg
  umount $st
  losetup -d $dev
  rm $f
done
"""


async def overhead(t: Target, n: int) -> dict[str, Any]:
    """ELV's whole volume life against the raw tools doing the same work from a
    shell script, interleaved in rounds so both see the same noise."""
    elv_total = raw_total = 0.0
    rounds = 5
    per = max(1, n // rounds)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per):
            await Volume(t, "ext4", 64 * MiB).life()
        elv_total += time.perf_counter() - t0
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec("bash", "-c", RAW_LIFE, "raw", t.base, str(per))
        if await proc.wait() != 0:
            raise RuntimeError("the raw-tools script failed")
        raw_total += time.perf_counter() - t0
    lives = per * rounds
    return {"lives": lives, "elv_s": elv_total / lives, "raw_s": raw_total / lives, "ratio": elv_total / raw_total}


async def _create_stage_publish(vols: list[Volume], clients: int) -> tuple[float, list[float]]:
    todo = iter(vols)
    lat: list[float] = []

    async def worker() -> None:
        for v in todo:
            t0 = time.perf_counter()
            await v.create()
            await v.stage()
            await v.publish()
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - t0, lat


async def _teardown(vols: list[Volume], parallel: int = 16) -> None:
    sem = asyncio.Semaphore(parallel)

    async def one(v: Volume) -> None:
        async with sem:
            await v.teardown()

    await asyncio.gather(*(one(v) for v in vols))


def _total(clients: int, per_client: int) -> int:
    return max(per_client * clients, 2 * clients, 32)


async def throughput(t: Target, clients: list[int], per_client: int) -> dict[str, Any]:
    """Volumes per second through create, stage and publish, with c concurrent clients."""
    out: dict[str, Any] = {}
    for c in clients:
        total = _total(c, per_client)
        vols = [Volume(t, "ext4", 32 * MiB) for _ in range(total)]
        wall, lat = await _create_stage_publish(vols, c)
        out[str(c)] = {"volumes": total, "per_second": total / wall, "p50": pct(lat, 50), "p99": pct(lat, 99)}
        await _teardown(vols)
    return out


# What one client of the throughput section does, by hand: $1 a directory of
# its own, $2 how many volumes. The devices are kept for RAW_DOWN (untimed).
RAW_UP = r"""
set -e
mkdir -p $1
for i in $(seq $2); do
  f=$1/v$i.img st=$1/st$i tg=$1/tg$i
  mkdir -p $st $tg
  truncate -s 32M $f
  dev=$(losetup --find --show --direct-io=on --sector-size 4096 $f)
  echo $dev >> $1/devices
  mkfs.ext4 -q -m 0 -E nodiscard,lazy_itable_init=1,lazy_journal_init=1 $dev
  mount $dev $st
  mount --bind $st $tg
done
"""

RAW_DOWN = r"""
for i in $(seq $2); do
  umount $1/tg$i $1/st$i
done
[ -f $1/devices ] && xargs -r -n 1 losetup -d < $1/devices
rm -rf $1
"""


async def _bash(script: str, *args: str) -> int:
    proc = await asyncio.create_subprocess_exec("bash", "-c", script, "raw", *args)
    return await proc.wait()


async def throughput_raw(base: str, clients: int, per_client: int) -> dict[str, Any]:
    """The raw tools' rate through the same work as :func:`throughput`:
    ``clients`` shell scripts at once, each making its share of the volumes
    (truncate, losetup, mkfs.ext4, mount, bind mount), timed together."""
    total = _total(clients, per_client)
    share = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    dirs = [os.path.join(base, f"raw-tp-{i}") for i in range(clients)]
    try:
        t0 = time.perf_counter()
        codes = await asyncio.gather(*(_bash(RAW_UP, d, str(n)) for d, n in zip(dirs, share, strict=True)))
        wall = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(_bash(RAW_DOWN, d, str(n)) for d, n in zip(dirs, share, strict=True)))
    if any(codes):
        raise RuntimeError("the raw-tools throughput script failed")
    return {"clients": clients, "volumes": total, "per_second": total / wall}


# The runtime any Python CSI driver carries: the interpreter, grpc's asyncio
# server on a unix socket and the generated CSI messages, serving nothing.
BARE = """
import asyncio, sys
import grpc
from csi.v1 import csi_pb2, csi_pb2_grpc

async def main():
    server = grpc.aio.server()
    server.add_insecure_port("unix://" + sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def bare_rss(base: str) -> int:
    """RSS of a bare Python + grpc server process (see BARE), idle."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BARE, os.path.join(base, "bare.sock"), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        if line.strip() != b"ready":
            raise RuntimeError("the bare Python+grpc process did not start")
        await asyncio.sleep(0.5)  # as idle as the driver it is compared with
        with open(f"/proc/{proc.pid}/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
    finally:
        proc.kill()
        await proc.wait()


async def _fill(t: Target, count: int) -> list[str]:
    sem = asyncio.Semaphore(32)
    ids: list[str] = []

    async def one() -> None:
        async with sem:
            v = Volume(t, None, MiB)
            await v.create()
            ids.append(v.vid)

    await asyncio.gather(*(one() for _ in range(count)))
    return ids


async def _restarts(t: Target, times: int) -> float:
    """Median seconds from a SIGKILL'd driver's new start to its first Probe answered."""
    took = []
    for _ in range(times):
        await t.stop(signal.SIGKILL)
        took.append(await t.start())
    return statistics.median(took)


async def scale(t: Target, levels: list[int], sample: int) -> dict[str, Any]:
    """At each pool size: CreateVolume p99, a full ListVolumes, GetCapacity,
    restart-to-ready (also with no volumes, the ratio's baseline) and RSS."""
    out: dict[str, Any] = {"idle_rss_bytes": t.rss_bytes(), "restart_0_s": await _restarts(t, 3)}
    # Volumes another section left behind count towards no level.
    before = len((await t.controller.ListVolumes(csi_pb2.ListVolumesRequest())).entries)
    have: list[str] = []
    for level in levels:
        have += await _fill(t, level - len(have))
        lat: list[float] = []
        extra = [Volume(t, None, MiB) for _ in range(sample)]
        for v in extra:
            t0 = time.perf_counter()
            await v.create()
            lat.append(time.perf_counter() - t0)
        for v in extra:
            await v.delete()
        t0 = time.perf_counter()
        listed = await t.controller.ListVolumes(csi_pb2.ListVolumesRequest())
        list_s = time.perf_counter() - t0
        if len(listed.entries) != before + level:
            raise RuntimeError(f"ListVolumes listed {len(listed.entries)} volumes, not {before} + {level}")
        t0 = time.perf_counter()
        await t.controller.GetCapacity(csi_pb2.GetCapacityRequest())
        cap_s = time.perf_counter() - t0
        rss = t.rss_bytes()
        ready = await _restarts(t, 3 if level <= 1000 else 1)
        out[str(level)] = {
            "create_p50": pct(lat, 50),
            "create_p99": pct(lat, 99),
            "list_s": list_s,
            "capacity_s": cap_s,
            "restart_to_ready_s": ready,
            "rss_bytes": rss,
            "rss_after_restart_bytes": t.rss_bytes(),
        }
    sem = asyncio.Semaphore(32)

    async def drop(vid: str) -> None:
        async with sem:
            await t.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))

    await asyncio.gather(*(drop(v) for v in have))
    return out


FIO_JOBS = {
    "randread-4k": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite-4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "read-1m": ["--rw=read", "--bs=1m", "--iodepth=8"],
    "write-1m": ["--rw=write", "--bs=1m", "--iodepth=8"],
}


RANDOM_JOBS = {k: v for k, v in FIO_JOBS.items() if k.startswith("rand")}


def _fio(directory: str, job: list[str], runtime: int, jobs: int = 1) -> dict[str, float]:
    """One fio job (``jobs`` copies of it, reported together) on 256 MiB of files."""
    argv = ["fio", "--name=bench", f"--directory={directory}", f"--size={256 // jobs}m", "--direct=1"]
    argv += ["--ioengine=libaio", "--time_based", f"--runtime={runtime}", "--ramp_time=1", "--output-format=json"]
    argv += [f"--numjobs={jobs}", "--group_reporting", *job]
    r = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=runtime + 120)
    j = json.loads(r.stdout)["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"]}


async def _fio_volume(t: Target, thick: bool) -> Volume:
    """A 1 GiB ext4 volume, staged and published (thick: every block allocated)."""
    v = Volume(t, "ext4", 1024 * MiB, parameters={PROVISIONING: "thick" if thick else "thin"})
    await v.create()
    await v.stage()
    await v.publish()
    return v


async def _compare(
    vol_dir: str, raw_dir: str, jobs: dict[str, list[str]], runtime: int, rounds: int, copies: int = 1
) -> dict[str, Any]:
    """Each job on the volume and on the pool's own filesystem, alternated job
    by job for ``rounds`` rounds (medians), so both sides see the same noise."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    for _ in range(rounds):
        for name, job in jobs.items():
            s = samples.setdefault(name, {"volume": [], "pool_fs": []})
            s["volume"].append(await asyncio.to_thread(_fio, vol_dir, job, runtime, copies))
            s["pool_fs"].append(await asyncio.to_thread(_fio, raw_dir, job, runtime, copies))
    out: dict[str, Any] = {}
    for name, s in samples.items():
        vol = {k: statistics.median(x[k] for x in s["volume"]) for k in ("iops", "bw_bytes")}
        raw = {k: statistics.median(x[k] for x in s["pool_fs"]) for k in ("iops", "bw_bytes")}
        ratios = [a["iops"] / b["iops"] for a, b in zip(s["volume"], s["pool_fs"], strict=True)]
        out[name] = {"volume": vol, "pool_fs": raw, "iops_ratio": vol["iops"] / raw["iops"], "round_ratios": ratios}
    return out


async def datapath(t: Target, runtime: int, rounds: int = 3, variants: bool = True) -> dict[str, Any]:
    """fio on a loop-backed ELV volume (thick, as the StorageClass that promises
    performance makes it) against the same job on the pool's own filesystem.
    ``variants`` adds, for the random 4 KiB jobs, where the loss is: a thin
    (sparse) volume, and four jobs at once instead of one."""
    if shutil.which("fio") is None:
        return {"unmeasured": "fio is not installed (apt-get install fio)"}
    raw_dir = os.path.join(t.pool, "fio-raw")
    os.makedirs(raw_dir, exist_ok=True)
    try:
        v = await _fio_volume(t, thick=True)
        try:
            out: dict[str, Any] = {"thick": True, "rounds": rounds}
            out.update(await _compare(v.target, raw_dir, FIO_JOBS, runtime, rounds))
            if variants:
                out["variants"] = {"thick, 4 jobs": await _compare(v.target, raw_dir, RANDOM_JOBS, runtime, rounds, 4)}
        finally:
            await v.teardown()
        if variants:
            thin = await _fio_volume(t, thick=False)
            try:
                out["variants"]["thin"] = await _compare(thin.target, raw_dir, RANDOM_JOBS, runtime, rounds)
            finally:
                await thin.teardown()
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
    return out


async def peer_sequences(t: Target, n: int, clients: int, fs: str | None) -> dict[str, Any]:
    """The RPC sequences both drivers share, for mount (``fs``) or raw block
    (None) volumes: create, stage, publish, snapshot, unpublish, unstage,
    delete, and create+stage+publish throughput. (The peer's mount volumes
    are plain directories, so its stage has no mkfs to do.)"""
    times: dict[str, list[float]] = {}
    size = 64 * MiB
    for _ in range(n):
        v = Volume(t, fs, size, times)
        await v.create()
        await v.stage()
        await v.publish()
        snap = await v._timed(
            "CreateSnapshot",
            t.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=uniq("ps"), source_volume_id=v.vid)),
        )
        await v.delete_snapshot(snap.snapshot.snapshot_id)
        await v.teardown()
    res: dict[str, Any] = {"latency": summary(times)}
    total = max(32, clients * 2)
    vols = [Volume(t, fs, size) for _ in range(total)]
    wall, _ = await _create_stage_publish(vols, clients)
    res["per_second"] = total / wall
    await _teardown(vols)
    return res
