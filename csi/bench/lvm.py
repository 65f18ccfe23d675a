"""``elv bench --backend lvm``: ELV's LVM volumes against the same LVM and
filesystem commands run by hand, side by side in one run.

It needs device-mapper, so on the CI machine it runs in the qemu guest
(``scripts/lvm-vm --bench``). It builds its own VG on loop devices (a thin
pool in it), starts ``elv serve --backend lvm`` on it, and for each case
times ELV's RPCs against the commands an administrator would type for the
same work, alternating the two in every round so both see the same noise:

* thick and thin: a volume's whole life (create, stage with mkfs.ext4,
  publish, unpublish, unstage, delete);
* snapshot (thick: copy-on-write; thin): CreateSnapshot + DeleteSnapshot;
* clone (thin: from a thin snapshot; thick: a block copy of a COW
  snapshot): CreateVolume from the snapshot + DeleteVolume;
* expand (thick, thin): ControllerExpandVolume + NodeExpandVolume of a
  mounted ext4 volume against lvextend + resize2fs.

ELV's background wipe of a deleted thick LV is not timed (no RPC waits for
it): every round waits for it to finish before the next step starts. The
driver runs with --log-level debug, so the commands it ran for each RPC are
read from its log and reported (``trace``). fio compares a thick LV,
published as a raw block volume, with a loop device on the same kind of
backing file: both sides run under the same emulation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from csi.bench.figures import LVM_CASES as CASES
from csi.bench.harness import MiB, Target, run_section, scratch
from csi.bench.sections import Volume, uniq
from csi.model import DEVICE_CLASS
from csi.v1 import csi_pb2

#: LVM as ELV runs it with ``udev = "off"`` and ``monitoring = false`` (the guest has neither).
LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 verify_udev_operations=1 monitoring=0} devices{obtain_device_list_from_udev=0}"
)
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
LVM_ENV = dict(ENV, LVM_SUPPRESS_FD_WARNINGS="1")
SIZE = 64 * MiB
GROWN = 128 * MiB
EXTENT = 4 * MiB
MKFS_EXT4 = ["mkfs.ext4", "-q", "-m", "0", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"]
FIO_JOBS = {
    "randread-4k": ["--rw=randread", "--bs=4k", "--iodepth=32"],
    "randwrite-4k": ["--rw=randwrite", "--bs=4k", "--iodepth=32"],
    "read-1m": ["--rw=read", "--bs=1m", "--iodepth=8"],
    "write-1m": ["--rw=write", "--bs=1m", "--iodepth=8"],
}
FIO_SIZE = 256 * MiB


def unavailable() -> str | None:
    """Why this machine cannot run the LVM bench, or None."""
    if os.geteuid() != 0:
        return "needs root"
    subprocess.run(["modprobe", "-a", "dm_mod", "dm_snapshot", "dm_thin_pool"], capture_output=True, check=False)
    if not _has_device_mapper():
        return "this kernel has no device-mapper: run it in the guest (scripts/lvm-vm --bench)"
    if shutil.which("lvm") is None:
        return "lvm2 is not installed"
    return None


def _has_device_mapper() -> bool:
    """The kernel registers device-mapper's control device in /proc/misc (a
    /dev/mapper/control node alone proves nothing: it may be left from elsewhere)."""
    try:
        with open("/proc/misc") as f:
            return any(line.split()[1:] == ["device-mapper"] for line in f)
    except OSError:
        return False


def lvm_argv(command: str, *args: str) -> list[str]:
    return ["lvm", command, "--config", LVM_CONFIG, *args]


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = LVM_ENV if argv[0] == "lvm" else ENV
    return subprocess.run(argv, capture_output=True, text=True, check=check, env=env, timeout=600)


class Bed:
    """A VG with a thin pool on two sparse files attached as loop devices, and a
    third loop device on the same kind of file: the raw disk fio compares with."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.vg = "elvbench" + secrets.token_hex(3)
        self.pool = "pool0"
        self.loops: list[str] = []
        self.files: list[str] = []
        self.raw_disk = ""

    def _loop(self, name: str, size: int) -> str:
        path = os.path.join(self.base, name)
        with open(path, "wb") as f:
            f.truncate(size)
        self.files.append(path)
        dev = run(["losetup", "--find", "--show", path]).stdout.strip()
        self.loops.append(dev)
        return dev

    def make(self) -> None:
        pvs = [self._loop(f"pv{i}.img", 4 * 1024 * MiB) for i in range(2)]
        self.raw_disk = self._loop("raw.img", FIO_SIZE + 16 * MiB)
        run(lvm_argv("pvcreate", "-q", *pvs))
        run(lvm_argv("vgcreate", "-q", "-s", f"{EXTENT // MiB}m", self.vg, *pvs))
        run(lvm_argv("lvcreate", "-q", "-y", "--type", "thin-pool", "-Z", "y", "-n", self.pool, "-L", "1g", self.vg))

    def destroy(self) -> None:
        if run(lvm_argv("vgs", self.vg), check=False).returncode == 0:
            run(lvm_argv("vgchange", "-an", self.vg), check=False)
            run(lvm_argv("vgremove", "-f", "-y", self.vg), check=False)
        for dev in self.loops:
            run(lvm_argv("pvremove", "-q", "-y", dev), check=False)
            run(["losetup", "-d", dev], check=False)
        for f in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)

    def config(self) -> str:
        path = os.path.join(self.base, "lvm.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                f'default-class = "thick"\nudev = "off"\nmonitoring = false\n'
                f'freeze-dir = "{self.base}/freeze"\n\n'
                f'[[device-class]]\nname = "thick"\nvg = "{self.vg}"\n\n'
                f'[[device-class]]\nname = "thin"\nvg = "{self.vg}"\nthin-pool = "{self.pool}"\n'
                "overprovision-ratio = 4.0\n"
            )
        return path

    def wipes_pending(self) -> bool:
        out = run(lvm_argv("lvs", "--noheadings", "-o", "lv_name,lv_tags", self.vg)).stdout
        return any("elv.wipe" in line or " elv-q-" in f" {line.strip()}" for line in out.splitlines())

    async def settle(self, timeout: float = 600.0) -> None:
        """Wait until ELV's wiper has removed every LV it quarantined."""
        deadline = time.monotonic() + timeout
        while await asyncio.to_thread(self.wipes_pending):
            if time.monotonic() > deadline:
                raise TimeoutError("ELV's wiper did not finish within the bench's patience")
            await asyncio.sleep(0.5)


class Raw:
    """The commands an administrator types, each timed as one step."""

    def __init__(self, bed: Bed) -> None:
        self.bed = bed
        self.times: dict[str, list[float]] = {}

    async def step(self, op: str, *argvs: list[str]) -> None:
        t0 = time.perf_counter()
        for argv in argvs:
            await asyncio.to_thread(run, argv)
        self.times.setdefault(op, []).append(time.perf_counter() - t0)

    def dev(self, name: str) -> str:
        """The LV's device node as an administrator names it (LVM makes the
        /dev/VG/LV link itself without udev; /dev/mapper's node otherwise)."""
        link = f"/dev/{self.bed.vg}/{name}"
        if os.path.exists(link):
            return link
        return "/dev/mapper/" + "-".join(x.replace("-", "--") for x in (self.bed.vg, name))

    def path(self, name: str) -> str:
        return f"{self.bed.vg}/{name}"

    def create_args(self, name: str, kind: str, size: int = SIZE) -> list[str]:
        if kind == "thin":
            return lvm_argv(
                "lvcreate", "-q", "-y", "-n", name, "-V", f"{size}b", "--thinpool", self.bed.pool, self.bed.vg
            )
        return lvm_argv("lvcreate", "-q", "-y", "-n", name, "-L", f"{size}b", "-W", "y", "-Z", "y", self.bed.vg)

    def dirs(self, name: str) -> tuple[str, str]:
        st, tg = os.path.join(self.bed.base, "raw", name, "st"), os.path.join(self.bed.base, "raw", name, "tg")
        os.makedirs(st, exist_ok=True)
        os.makedirs(tg, exist_ok=True)
        return st, tg

    async def up(self, name: str, kind: str, timed: bool = True) -> None:
        """create, stage (mkfs, mount), publish (bind mount)."""
        st, tg = self.dirs(name)
        run_ = self.step if timed else self._step_untimed
        await run_("CreateVolume", self.create_args(name, kind))
        dev = self.dev(name)  # now that it exists
        await run_("NodeStageVolume", [*MKFS_EXT4, dev], ["mount", dev, st])
        await run_("NodePublishVolume", ["mount", "--bind", st, tg])

    async def down(self, name: str, timed: bool = True) -> None:
        """unpublish, unstage (umount, deactivate), delete."""
        st, tg = self.dirs(name)
        steps = [
            ("NodeUnpublishVolume", [["umount", tg]]),
            ("NodeUnstageVolume", [["umount", st], lvm_argv("lvchange", "-q", "-an", self.path(name))]),
            ("DeleteVolume", [lvm_argv("lvremove", "-q", "-y", self.path(name))]),
        ]
        for op, argvs in steps:
            await (self.step(op, *argvs) if timed else self._untimed(*argvs))

    @staticmethod
    async def _untimed(*argvs: list[str]) -> None:
        for argv in argvs:
            await asyncio.to_thread(run, argv)

    async def _step_untimed(self, op: str, *argvs: list[str]) -> None:
        await self._untimed(*argvs)


def cow_size(origin: int) -> int:
    """The COW store ELV gives a thick snapshot by default (100 % of the origin,
    its exception table and a spare extent), so both sides ask LVM for the same."""
    data = origin + origin // 128 + EXTENT
    return -(-data // EXTENT) * EXTENT


class Tracer:
    """The commands ELV ran for each RPC, read from its debug log: each
    process it started, and each report its resident ``lvm shell`` answered
    (marked "(shell)")."""

    EXEC = re.compile(r'msg="?(exec|shell) ([^"\n]*)')

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.offset = 0
        self.on = False
        self.rpcs: list[tuple[str, list[str]]] = []

    def skip(self) -> None:
        """Forget what the log holds so far (startup, untimed setup)."""
        with contextlib.suppress(FileNotFoundError):
            self.offset = os.path.getsize(self.log_path)

    def __call__(self, op: str) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read().decode("utf-8", "replace")
            self.offset = f.tell()
        if self.on:
            found = self.EXEC.findall(chunk)
            self.rpcs.append((op, [short(c) + (" (shell)" if how == "shell" else "") for how, c in found]))


def short(command: str) -> str:
    """``lvm lvcreate --config ... -n x`` -> ``lvm lvcreate``; ``/sbin/mkfs.ext4 ...`` -> ``mkfs.ext4``."""
    words = command.split()
    if not words:
        return ""
    prog = os.path.basename(words[0])
    return f"{prog} {words[1]}" if prog == "lvm" and len(words) > 1 else prog


class LvmBench:
    def __init__(self, elv: Target, bed: Bed, tracer: Tracer) -> None:
        self.elv = elv
        self.bed = bed
        self.tracer = tracer

    def vol(self, kind: str, times: dict[str, list[float]], fs: str | None = "ext4", size: int = SIZE) -> Volume:
        return Volume(self.elv, fs, size, times, {DEVICE_CLASS: kind})

    async def untimed(self, v: Volume, *steps: Callable[[], Awaitable[None]]) -> None:
        """Run steps of v's life without timing or tracing them."""
        saved, v.times = v.times, {}
        tracing, self.tracer.on = self.tracer.on, False
        try:
            for s in steps:
                await s()
        finally:
            v.times = saved
            self.tracer.on = tracing
        self.tracer.skip()

    # -- the cases: each returns (ELV's RPC times, the raw steps' times) of one round

    async def life(self, kind: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        elv: dict[str, list[float]] = {}
        await self.vol(kind, elv).life()
        await self.bed.settle()
        self.tracer.skip()
        raw = Raw(self.bed)
        name = uniq("raw")
        await raw.up(name, kind)
        await raw.down(name)
        return elv, raw.times

    async def _origin(self, kind: str) -> Volume:
        v = self.vol(kind, {})
        await self.untimed(v, v.create, v.stage, v.publish)
        await asyncio.to_thread(_write, os.path.join(v.target, "data"), 8 * MiB)
        self.tracer.skip()
        return v

    async def _raw_origin(self, raw: Raw, kind: str) -> str:
        name = uniq("rawo")
        await raw.up(name, kind, timed=False)
        await asyncio.to_thread(_write, os.path.join(raw.dirs(name)[1], "data"), 8 * MiB)
        return name

    async def snapshot(self, kind: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        origin = await self._origin(kind)
        elv: dict[str, list[float]] = {}
        origin.times = elv
        snap = await origin._timed(
            "CreateSnapshot",
            self.elv.controller.CreateSnapshot(
                csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=origin.vid)
            ),
        )
        await origin.delete_snapshot(snap.snapshot.snapshot_id)
        origin.times = {}
        await self.untimed(origin, origin.teardown)
        await self.bed.settle()
        self.tracer.skip()
        raw = Raw(self.bed)
        name = await self._raw_origin(raw, kind)
        snap_name = uniq("raws")
        size = ["-L", f"{cow_size(SIZE)}b"] if kind == "thick" else []
        await raw.step("CreateSnapshot", lvm_argv("lvcreate", "-q", "-y", "-s", "-n", snap_name, *size, raw.path(name)))
        await raw.step("DeleteSnapshot", lvm_argv("lvremove", "-q", "-y", raw.path(snap_name)))
        await raw.down(name, timed=False)
        return elv, raw.times

    async def clone(self, kind: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        origin = await self._origin(kind)
        snap = await self.elv.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=origin.vid)
        )
        sid = snap.snapshot.snapshot_id
        self.tracer.skip()
        elv: dict[str, list[float]] = {}
        c = self.vol(kind, elv)
        src = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid))
        await c.create(src)
        await c.delete()
        await self.elv.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
        await self.untimed(origin, origin.teardown)
        await self.bed.settle()
        self.tracer.skip()
        raw = Raw(self.bed)
        name = await self._raw_origin(raw, kind)
        snap_name, clone_name = uniq("raws"), uniq("rawc")
        size = ["-L", f"{cow_size(SIZE)}b"] if kind == "thick" else []
        await asyncio.to_thread(run, lvm_argv("lvcreate", "-q", "-y", "-s", "-n", snap_name, *size, raw.path(name)))
        if kind == "thin":
            made = [lvm_argv("lvcreate", "-q", "-y", "-s", "-kn", "-n", clone_name, raw.path(snap_name))]
        else:
            dd = ["dd", f"if={raw.dev(snap_name)}", f"of={raw.dev(clone_name)}", "bs=4M"]
            made = [raw.create_args(clone_name, "thick"), [*dd, "iflag=direct", "oflag=direct", "conv=fsync"]]
        await raw.step("CreateVolume", *made)
        await raw.step("DeleteVolume", lvm_argv("lvremove", "-q", "-y", raw.path(clone_name)))
        await asyncio.to_thread(run, lvm_argv("lvremove", "-q", "-y", raw.path(snap_name)))
        await raw.down(name, timed=False)
        return elv, raw.times

    async def expand(self, kind: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        v = await self._origin(kind)
        elv: dict[str, list[float]] = {}
        v.times = elv
        rng = csi_pb2.CapacityRange(required_bytes=GROWN)
        await v._timed(
            "ControllerExpandVolume",
            self.elv.controller.ControllerExpandVolume(
                csi_pb2.ControllerExpandVolumeRequest(volume_id=v.vid, capacity_range=rng)
            ),
        )
        await v._timed(
            "NodeExpandVolume",
            self.elv.node.NodeExpandVolume(
                csi_pb2.NodeExpandVolumeRequest(volume_id=v.vid, volume_path=v.target, capacity_range=rng)
            ),
        )
        v.times = {}
        await self.untimed(v, v.teardown)
        await self.bed.settle()
        self.tracer.skip()
        raw = Raw(self.bed)
        name = await self._raw_origin(raw, kind)
        await raw.step("ControllerExpandVolume", lvm_argv("lvextend", "-q", "-L", f"{GROWN}b", raw.path(name)))
        await raw.step("NodeExpandVolume", ["resize2fs", raw.dev(name)])
        await raw.down(name, timed=False)
        return elv, raw.times

    async def case(self, name: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        what, _, kind = name.partition("-")
        if not kind:
            return await self.life(what)
        fn = {"snapshot": self.snapshot, "clone": self.clone, "expand": self.expand}[what]
        return await fn(kind)


def _write(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())


def summarize(rounds: list[tuple[dict[str, list[float]], dict[str, list[float]]]]) -> dict[str, Any]:
    """Per case: the ratio of ELV's total time to the raw steps' over all
    rounds, each round's ratio (the spread), and per-step medians."""
    elv_totals = [sum(sum(v) for v in e.values()) for e, _ in rounds]
    raw_totals = [sum(sum(v) for v in r.values()) for _, r in rounds]
    steps: dict[str, dict[str, float]] = {}
    for op in rounds[0][0]:
        e = statistics.median(sum(x[0].get(op, [])) for x in rounds)
        r = statistics.median(sum(x[1].get(op, [])) for x in rounds)
        steps[op] = {"elv_s": e, "raw_s": r, "ratio": e / r if r > 0 else float("nan")}
    return {
        "ratio": sum(elv_totals) / sum(raw_totals),
        "round_ratios": [e / r for e, r in zip(elv_totals, raw_totals, strict=True)],
        "elv_s": statistics.median(elv_totals),
        "raw_s": statistics.median(raw_totals),
        "steps": steps,
    }


async def cases(b: LvmBench, rounds: int, which: tuple[str, ...] = CASES) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in which:
        got = []
        for r in range(rounds):
            b.tracer.skip()
            b.tracer.on = r == 0
            b.tracer.rpcs = []
            got.append(await b.case(name))
            if r == 0:
                out.setdefault("trace", {})[name] = [{"rpc": op, "commands": cmds} for op, cmds in b.tracer.rpcs]
            b.tracer.on = False
        out[name] = summarize(got)
    return out


def _fio(target: str, job: list[str], runtime: int) -> dict[str, float]:
    argv = ["fio", "--name=bench", f"--filename={target}", f"--size={FIO_SIZE}", "--direct=1", "--ioengine=libaio"]
    argv += ["--time_based", f"--runtime={runtime}", "--ramp_time=1", "--output-format=json", *job]
    r = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=runtime + 300)
    j = json.loads(r.stdout)["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    return {"iops": side["iops"], "bw_bytes": side["bw_bytes"]}


def _fill(target: str) -> None:
    """Write every block once, so neither side pays for first allocation while measured."""
    argv = ["fio", "--name=fill", f"--filename={target}", f"--size={FIO_SIZE}", "--rw=write", "--bs=1m"]
    subprocess.run([*argv, "--direct=1", "--ioengine=libaio", "--iodepth=8"], capture_output=True, check=True)


async def fio(b: LvmBench, runtime: int, rounds: int) -> dict[str, Any]:
    """fio on a thick LV published as a raw block volume through ELV, against a
    loop device on the same kind of backing file (the guest's raw disk), and
    against a thick LV of the same VG made by hand with ``lvcreate``: the
    volume against the hand-made LV is ELV's own share of any gap, the
    hand-made LV against the raw disk is device-mapper's. The three run in
    turn, every job and round, so drift on the host hits them alike."""
    if shutil.which("fio") is None:
        return {"unmeasured": "fio is not installed (apt-get install fio)"}
    v = Volume(b.elv, None, FIO_SIZE, {}, {DEVICE_CLASS: "thick"})
    raw = Raw(b.bed)
    hand = uniq("fioh")
    await v.create()
    try:
        await v.stage()
        await v.publish()
        await asyncio.to_thread(run, raw.create_args(hand, "thick", FIO_SIZE))
        targets = {"volume": v.target, "hand_lv": raw.dev(hand), "raw_disk": b.bed.raw_disk}
        for target in targets.values():
            await asyncio.to_thread(_fill, target)
        samples: dict[str, dict[str, list[dict[str, float]]]] = {}
        for _ in range(rounds):
            for name, job in FIO_JOBS.items():
                s = samples.setdefault(name, {side: [] for side in targets})
                for side, target in targets.items():
                    s[side].append(await asyncio.to_thread(_fio, target, job, runtime))
        out: dict[str, Any] = {"rounds": rounds, "runtime_s": runtime}
        for name, s in samples.items():
            vol, by_hand, disk = (statistics.median(x["iops"] for x in s[side]) for side in targets)
            out[name] = {
                "volume_iops": vol,
                "hand_lv_iops": by_hand,
                "raw_disk_iops": disk,
                "iops_ratio": vol / disk,
                "volume_vs_hand_lv": vol / by_hand,
                "hand_lv_vs_raw_disk": by_hand / disk,
            }
        return out
    finally:
        await asyncio.to_thread(run, lvm_argv("lvremove", "-q", "-y", raw.path(hand)), check=False)
        await v.teardown()
        await b.bed.settle()


@contextlib.contextmanager
def bed() -> Iterator[Bed]:
    with scratch("bench-lvm") as base:
        b = Bed(base)
        try:
            b.make()
            yield b
        finally:
            b.destroy()


SECTIONS = ("lvm-cases", "lvm-fio")


async def run_all(res: dict[str, Any], quick: bool, want: set[str]) -> None:
    """The LVM sections in one run, into ``res``."""
    why = unavailable()
    if why is not None:
        for name in SECTIONS:
            res[name] = {"unmeasured": why}
        return
    with bed() as b:
        elv = Target.elv_lvm(b.base, b.config(), log_level="debug")
        tracer = Tracer(elv.log_path)
        res["startup_s"] = await elv.start()
        elv.on_rpc = tracer
        bench = LvmBench(elv, b, tracer)
        try:
            await run_section(res, "lvm-cases", want, lambda: cases(bench, 1 if quick else 3))
            await run_section(res, "lvm-fio", want, lambda: fio(bench, 3 if quick else 5, 1 if quick else 3))
        finally:
            await elv.stop()
