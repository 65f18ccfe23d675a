"""Per-operation latencies in the guest: raw LVM commands, and the CSI RPCs
that wrap them. Printed, and written to ci-out/lvm-latency.json. The guest is
emulated (TCG), so absolute numbers are many times those of real hardware;
the ratios between operations are what carry over."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator

from csi.model import DEVICE_CLASS as CLASS
from csi.v1 import csi_pb2
from tests.support.lvm import GuestVg, LvmDriver, MiB, lvm
from tests.support.paths import REPO

ROUNDS = 3


class Clock:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def time(self, what: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.samples.setdefault(what, []).append((time.monotonic() - start) * 1000)

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {"median_ms": round(statistics.median(v), 1), "min_ms": round(min(v), 1), "max_ms": round(max(v), 1)}
            for k, v in self.samples.items()
        }


def test_latencies(driver: LvmDriver, vg: GuestVg) -> None:
    raw, rpc = Clock(), Clock()
    g, ctl = vg.name, driver.controller
    for i in range(ROUNDS):
        n = f"lat{i}"
        with raw.time("lvcreate thick"):
            lvm("lvcreate", "-q", "-y", "-n", n + "k", "-L", "64m", "-W", "y", "-Z", "y", g)
        with raw.time("lvcreate thin"):
            lvm("lvcreate", "-q", "-y", "-n", n + "t", "-V", "64m", "--thinpool", vg.pool, g)
        with raw.time("snapshot thick"):
            lvm("lvcreate", "-q", "-y", "-s", "-n", n + "ks", "-L", "68m", f"{g}/{n}k")
        with raw.time("snapshot thin"):
            lvm("lvcreate", "-q", "-y", "-s", "-n", n + "ts", f"{g}/{n}t")
        with raw.time("lvextend thin"):
            lvm("lvextend", "-q", "-L", "128m", f"{g}/{n}t")
        with raw.time("lvs report"):
            lvm("lvs", "--reportformat", "json", g)
        with raw.time("lvremove"):
            lvm("lvremove", "-q", "-y", f"{g}/{n}ts")
        lvm("lvremove", "-q", "-y", f"{g}/{n}ks", f"{g}/{n}k", f"{g}/{n}t")

        for cls in ("thick", "thin"):
            with rpc.time(f"CreateVolume {cls}"):
                vid = driver.create(f"{n}-{cls}", 64 * MiB, parameters={CLASS: cls})
            with rpc.time(f"CreateSnapshot {cls}"):
                sid = ctl.CreateSnapshot(
                    csi_pb2.CreateSnapshotRequest(name=f"{n}-{cls}-snap", source_volume_id=vid)
                ).snapshot.snapshot_id
            with rpc.time(f"DeleteSnapshot {cls}"):
                ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
            # (after the snapshot is gone: a thick origin grows only while it has none, or is inactive)
            with rpc.time(f"ControllerExpandVolume {cls}"):
                ctl.ControllerExpandVolume(
                    csi_pb2.ControllerExpandVolumeRequest(
                        volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=128 * MiB)
                    )
                )
            with rpc.time(f"DeleteVolume {cls}"):
                driver.delete(vid)

    result = {"rounds": ROUNDS, "lvm_commands": raw.summary(), "csi_rpcs": rpc.summary()}
    os.makedirs(os.path.join(REPO, "ci-out"), exist_ok=True)
    with open(os.path.join(REPO, "ci-out", "lvm-latency.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nlatency in the guest (median of {ROUNDS}, ms):")
    for section in (raw, rpc):
        for k, v in section.summary().items():
            print(f"  {k:32s} {v['median_ms']:9.1f}")
