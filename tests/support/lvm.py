"""The in-guest LVM test bed: a VG on loop files, and ``elv serve --backend lvm``.

These tests run only inside the test VM (scripts/lvm-vm): the CI machine's own
kernel has no device-mapper. Everything they make (LVs, the VG, its PVs, the
loop devices and files) is removed at the end, even after a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass

from tests.support.driver import Driver

MiB = 1024 * 1024
GiB = 1024 * MiB
LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
#: LVM as the tests run it: no udev, no dmeventd (the guest has no use for either).
LVM_CONFIG = (
    "activation{udev_sync=0 udev_rules=0 verify_udev_operations=1 monitoring=0} devices{obtain_device_list_from_udev=0}"
)
LV_FIELDS = "lv_name,lv_size,lv_attr,lv_tags,pool_lv,origin,lv_kernel_major,lv_kernel_minor,segtype,data_percent"
#: The tag that makes an LV ELV's (csi.backend.lvm.model; the tests' driver name).
OWNER_TAG = "elv.owner=elv.csi.dev"


def lvm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["lvm", args[0], "--config", LVM_CONFIG, *args[1:]]
    env = dict(os.environ, **LVM_ENV)
    return subprocess.run(argv, capture_output=True, text=True, check=check, env=env, timeout=300)


def lvs(vg: str) -> list[dict[str, str]]:
    out = lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", LV_FIELDS, vg).stdout
    rows: list[dict[str, str]] = json.loads(out)["report"][0]["lv"]
    return rows


def ours(vg: GuestVg) -> list[str]:
    """The owner filter: the LVs of ``vg`` that carry ELV's owner tag."""
    return sorted(r["lv_name"] for r in lvs(vg.name) if OWNER_TAG in r["lv_tags"].split(","))


def lv(vg: str, name: str) -> dict[str, str] | None:
    return next((r for r in lvs(vg) if r["lv_name"] == name), None)


def wait_for(cond: object, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    raise TimeoutError(f"{what} not reached within {timeout}s")


@dataclass
class GuestVg:
    name: str
    pool: str
    pvs: list[str]
    files: list[str]


def make_vg(name: str, workdir: str, sizes: tuple[int, ...] = (4 * GiB, 4 * GiB)) -> GuestVg:
    files, pvs = [], []
    for i, size in enumerate(sizes):
        path = os.path.join(workdir, f"{name}-pv{i}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        files.append(path)
        dev = subprocess.run(["losetup", "-f", "--show", path], capture_output=True, text=True, check=True).stdout
        pvs.append(dev.strip())
    vg = GuestVg(name, "pool0", pvs, files)
    lvm("pvcreate", "-q", *pvs)
    lvm("vgcreate", "-q", name, *pvs)
    lvm("lvcreate", "-q", "-y", "--type", "thin-pool", "-Z", "y", "-n", vg.pool, "-L", "1g", name)
    return vg


def destroy_vg(vg: GuestVg) -> list[str]:
    """Remove everything; return what could not be removed."""
    problems = []
    for r in lvs(vg.name) if lvm("vgs", vg.name, check=False).returncode == 0 else []:
        if r["lv_kernel_major"] not in ("", "-1"):
            lvm("lvchange", "-an", f"{vg.name}/{r['lv_name']}", check=False)
    if lvm("vgs", vg.name, check=False).returncode == 0:
        res = lvm("vgremove", "-f", "-y", vg.name, check=False)
        if res.returncode != 0:
            problems.append(f"vgremove: {res.stderr.strip()}")
    for pv in vg.pvs:
        lvm("pvremove", "-q", "-y", pv, check=False)
        subprocess.run(["losetup", "-d", pv], check=False, capture_output=True)
    for f in vg.files:
        if os.path.exists(f):
            os.unlink(f)
    return problems


def write_config(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def class_config(vg: GuestVg, default: str = "thick", udev: str = "off", ratio: float = 1.0) -> str:
    return f"""
default-class = "{default}"
udev = "{udev}"
monitoring = false
freeze-dir = "/run/elv-test-freeze-{vg.name}"

[[device-class]]
name = "thick"
vg = "{vg.name}"

[[device-class]]
name = "thin"
vg = "{vg.name}"
thin-pool = "{vg.pool}"
overprovision-ratio = {ratio}
"""


class LvmDriver(Driver):
    """``elv serve --backend lvm`` with the given backend arguments."""

    def __init__(self, base: str, backend_args: list[str], *extra: str) -> None:
        super().__init__(base, *extra)
        self.backend_args = backend_args

    def wait_ready(self, timeout: float = 120.0) -> None:
        # Python imports over 9p under emulation take many seconds, then lvs runs.
        super().wait_ready(timeout)

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--backend")
        # Replace "--backend loop --loop-dir POOL" with the lvm arguments.
        return [*argv[:i], "--backend", "lvm", *self.backend_args, *argv[i + 4 :]]
