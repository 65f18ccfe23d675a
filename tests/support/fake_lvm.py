"""A tiny in-memory LVM, for the LVM backend's decision logic.

It answers ``lvm lvs/vgs`` with JSON shaped like the captured reports and
applies lvcreate/lvremove/lvrename/lvchange/lvextend to its model, recording
every argv in ``calls``, so tests can assert what ELV asked LVM to do (and
not to do). It answers through the one fake runner: ``runner()`` is a
FakeRunner whose every command it handles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from csi.backend.lvm import devnode, wipe
from csi.backend.lvm.backend import LvmBackend
from csi.backend.lvm.classes import parse_config
from csi.backend.lvm.command import Lvm
from csi.backend.lvm.store import LvStore
from csi.errors import CommandError
from csi.host.fs import FsTool
from csi.model import Device
from tests.support.fakes import FakeRunner

MiB = 1024 * 1024
GiB = 1024 * MiB
#: The device classes the unit tests configure: "thick", and "thin" in pool0, both in vg0.
CLASSES = """
[[device-class]]
name = "thick"
vg = "vg0"
[[device-class]]
name = "thin"
vg = "vg0"
thin-pool = "pool0"
"""
#: The tag that makes an LV ELV's.
OWNER = "elv.owner=elv.csi.dev"
#: A device-class file over the fake VG: thick (the default) and thin.
CONFIG = f"""
default-class = "thick"
udev = "off"
freeze-dir = "/nonexistent/elv-freeze"
{CLASSES}"""


@dataclass
class FakeLv:
    name: str
    vg: str
    size: int
    segtype: str = "linear"
    tags: list[str] = field(default_factory=list)
    pool: str = ""
    origin: str = ""
    active: bool = True
    open: bool = False
    skip: bool = False
    minor: int = 0
    data_percent: float = 0.0
    metadata_percent: float = 0.0
    zero: bool = True
    health: str = ""  # lv_health_status, e.g. "out_of_data" for a full pool
    when_full: str = "queue"  # a pool's --errorwhenfull: "queue" or "error"
    chunk: int = 64 * 1024

    def attr(self, lvs: dict[tuple[str, str], FakeLv]) -> str:
        if self.segtype == "thin-pool":
            t = "t"
        elif self.segtype == "thin":
            t = "V"
        elif self.origin:
            t = "s"
        elif any(o.origin == self.name and o.segtype != "thin" for o in lvs.values() if o.vg == self.vg):
            t = "o"
        else:
            t = "-"
        health = {"out_of_data": "D", "metadata_read_only": "M", "failed": "F"}.get(self.health, "-")
        a, o, k = "a" if self.active else "-", "o" if self.open else "-", "k" if self.skip else "-"
        return f"{t}wi-{a}{o}--{health}{k}" if t == "t" else f"{t}wi-{a}{o}----{k}"


class FakeLvm:
    def __init__(self, vg: str = "vg0", vg_size: int = 10 * GiB, extent: int = 4 * MiB) -> None:
        self.vgs = {vg: (vg_size, extent)}
        self.lvs: dict[tuple[str, str], FakeLv] = {}
        self.calls: list[tuple[str, ...]] = []
        self.sysfs_sure = True  # what the fake sysfs scan says of its own completeness
        self._minor = 0
        self.fail: dict[str, tuple[int, bytes]] = {}

    # -- helpers ------------------------------------------------------------------

    def add(self, lv: FakeLv) -> FakeLv:
        self._minor += 1
        lv.minor = self._minor
        self.lvs[(lv.vg, lv.name)] = lv
        return lv

    def free(self, vg: str) -> int:
        size, _ = self.vgs[vg]
        return size - sum(lv.size for lv in self.lvs.values() if lv.vg == vg and lv.segtype != "thin")

    def commands(self) -> list[str]:
        return [c[1] if c[0] == "lvm" else c[0] for c in self.calls]

    def changes(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] != "lvm" or c[1] not in ("lvs", "vgs")]

    # -- answering commands ---------------------------------------------------------

    def runner(self) -> FakeRunner:
        return FakeRunner(handler=self.handle)

    def handle(self, args: tuple[str, ...]) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) of one command; any other program than lvm succeeds."""
        self.calls.append(args)
        if args[0] != "lvm":
            return 0, b"", b""
        cmd = args[1]
        rest = list(args[2:])
        if rest[:1] == ["--config"]:
            rest = rest[2:]
        if cmd in self.fail:
            rc, err = self.fail.pop(cmd)
            raise CommandError(args, rc, b"", err)
        result: tuple[int, bytes, bytes] = getattr(self, "_" + cmd)(rest)
        return result

    def _report(self, kind: str, rows: list[dict[str, str]]) -> bytes:
        return json.dumps({"report": [{kind: rows}]}).encode()

    def _lvs(self, args: list[str]) -> tuple[int, bytes, bytes]:
        vgs = args[args.index("--") + 1 :]
        missing = [v for v in vgs if v not in self.vgs]
        rows = []
        for lv in sorted(self.lvs.values(), key=lambda x: x.name):
            if lv.vg not in vgs:
                continue
            size, extent = self.vgs[lv.vg]
            rows.append(
                {
                    "lv_name": lv.name,
                    "vg_name": lv.vg,
                    "lv_uuid": f"uuid-{lv.minor}",
                    "lv_size": str(lv.size),
                    "lv_attr": lv.attr(self.lvs),
                    "lv_tags": ",".join(sorted(lv.tags)),
                    "pool_lv": lv.pool,
                    "origin": lv.origin,
                    "data_percent": f"{lv.data_percent:.2f}" if lv.segtype.startswith("thin") else "",
                    "metadata_percent": f"{lv.metadata_percent:.2f}" if lv.segtype == "thin-pool" else "",
                    "lv_device_open": "open" if lv.open else "",
                    "lv_kernel_major": "254" if lv.active else "-1",
                    "lv_kernel_minor": str(lv.minor) if lv.active else "-1",
                    "segtype": lv.segtype,
                    "zero": ("zero" if lv.zero else "") if lv.segtype == "thin-pool" else "unknown",
                    "lv_health_status": lv.health,
                    "copy_percent": "",
                    "lv_metadata_size": "",
                    "chunk_size": str(lv.chunk) if lv.segtype == "thin-pool" else "0",
                    "lv_when_full": lv.when_full if lv.segtype == "thin-pool" else "",
                    "vg_free": str(self.free(lv.vg)),
                    "vg_size": str(size),
                    "vg_extent_size": str(extent),
                }
            )
        err = b"".join(f'  Volume group "{v}" not found\n'.encode() for v in missing)
        return (5 if missing else 0), self._report("lv", rows), err

    def _vgs(self, args: list[str]) -> tuple[int, bytes, bytes]:
        vgs = args[args.index("--") + 1 :]
        rows = []
        for v in vgs:
            if v in self.vgs:
                size, extent = self.vgs[v]
                free = self.free(v)
                rows.append(
                    {
                        "vg_name": v,
                        "vg_uuid": "u",
                        "vg_size": str(size),
                        "vg_free": str(free),
                        "vg_extent_size": str(extent),
                        "vg_extent_count": str(size // extent),
                        "vg_free_count": str(free // extent),
                        "pv_count": "1",
                        "lv_count": "0",
                        "vg_tags": "",
                    }
                )
        missing = [v for v in vgs if v not in self.vgs]
        err = b"".join(f'  Volume group "{v}" not found\n'.encode() for v in missing)
        return (5 if missing else 0), self._report("vg", rows), err

    @staticmethod
    def _opts(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
        flags = {"-y", "-s", "-ay", "-an", "-K"}
        opts: dict[str, list[str]] = {}
        pos: list[str] = []
        i = 0
        while i < len(args):
            a = args[i]
            if a in flags:
                opts.setdefault(a, []).append("")
                i += 1
            elif a.startswith("-"):
                opts.setdefault(a, []).append(args[i + 1])
                i += 2
            else:
                pos.append(a)
                i += 1
        return opts, pos

    def _lv(self, path: str) -> FakeLv | None:
        vg, _, name = path.partition("/")
        return self.lvs.get((vg, name))

    def _lvcreate(self, args: list[str]) -> tuple[int, bytes, bytes]:
        opts, pos = self._opts(args)
        name = opts["-n"][0]
        target = pos[-1]
        vg = target.split("/")[0]
        if (vg, name) in self.lvs:
            return 5, b"", f'  Logical Volume "{name}" already exists in volume group "{vg}"\n'.encode()
        tags = opts.get("--addtag", [])
        skip = opts.get("--setactivationskip", ["n"])[0] == "y"
        if "-s" in opts:
            origin = self._lv(target)
            if origin is None:
                return 5, b"", f"  Snapshot origin LV {target} not found\n".encode()
            if origin.segtype == "thin":
                lv = FakeLv(name, vg, origin.size, "thin", tags, origin.pool, origin.name, active=not skip, skip=skip)
            else:
                size = int(opts["-L"][0].rstrip("b"))
                lv = FakeLv(name, vg, size, "linear", tags, "", origin.name, active=origin.active)
        elif "-V" in opts:
            size = int(opts["-V"][0].rstrip("b"))
            lv = FakeLv(name, vg, size, "thin", tags, opts["--thinpool"][0], active="-an" not in opts)
        else:
            size = int(opts["-L"][0].rstrip("b"))
            if size > self.free(vg):
                return 5, b"", f'  Volume group "{vg}" has insufficient free space (1 extents): 9 required.\n'.encode()
            lv = FakeLv(name, vg, size, "linear", tags)
        self.add(lv)
        return 0, b"", b""

    def _lvremove(self, args: list[str]) -> tuple[int, bytes, bytes]:
        _, pos = self._opts(args)
        rc, err = 0, b""
        for path in pos:  # like LVM: remove what exists, complain about the rest
            lv = self._lv(path)
            if lv is None:
                rc, err = 5, err + f'  Failed to find logical volume "{path}"\n'.encode()
            else:
                del self.lvs[(lv.vg, lv.name)]
        return rc, b"", err

    def _lvrename(self, args: list[str]) -> tuple[int, bytes, bytes]:
        vg, old, new = args
        lv = self.lvs.pop((vg, old))
        lv.name = new
        self.lvs[(vg, new)] = lv
        for other in self.lvs.values():
            if other.vg == vg and other.origin == old:
                other.origin = new
        return 0, b"", b""

    def _lvchange(self, args: list[str]) -> tuple[int, bytes, bytes]:
        opts, pos = self._opts(args)
        for path in pos:
            lv = self._lv(path)
            if lv is None:
                return 5, b"", f'  Failed to find logical volume "{path}"\n'.encode()
            for t in opts.get("--deltag", []):
                if t in lv.tags:
                    lv.tags.remove(t)
            for t in opts.get("--addtag", []):
                if t not in lv.tags:
                    lv.tags.append(t)
            if "-ay" in opts or "-an" in opts:
                cow = lv.origin != "" and lv.segtype != "thin"
                if cow and "-y" not in opts:
                    # LVM asks "Change of snapshot ... will also change its
                    # origin ... Proceed? [y/n]"; with no terminal the answer is no.
                    return 5, b"", f"  Logical volume {path} not changed.\n".encode()
                # A COW snapshot and its origin are (de)activated together.
                head = self.lvs[(lv.vg, lv.origin)] if cow else lv
                for x in [
                    head,
                    *(o for o in self.lvs.values() if o.vg == lv.vg and o.origin == head.name and o.segtype != "thin"),
                ]:
                    x.active = "-ay" in opts
        return 0, b"", b""

    def _lvextend(self, args: list[str]) -> tuple[int, bytes, bytes]:
        opts, pos = self._opts(args)
        lv = self._lv(pos[0])
        assert lv is not None
        lv.size = int(opts["-L"][0].rstrip("b"))
        return 0, b"", b""


def backend_over(lvm: FakeLvm, config: str) -> LvmBackend:
    """An LvmBackend (class file ``config``) whose every command ``lvm`` answers."""
    settings = parse_config(config)
    runner: Any = lvm.runner()
    store = LvStore(settings, Lvm(runner, udev=False), runner, FsTool(runner), "elv.csi.dev", make_nodes=True)
    return LvmBackend(settings, store)


def fake_sysfs(monkeypatch: pytest.MonkeyPatch, lvm: FakeLvm) -> None:
    """sysfs and /dev as the fake LVM would make them: an active LV with minor
    N is the disk dm-N (254:N), with its node at /dev/dm-N."""

    def by_dm_name(name: str, *a: Any) -> tuple[str, int, int] | None:
        for lv in lvm.lvs.values():
            if lv.active and devnode.dm_name(lv.vg, lv.name) == name:
                return f"dm-{lv.minor}", 254, lv.minor
        return ("dm-99", 254, 99) if name.endswith("-cow") else None

    async def fake_wait(major: int, minor: int, **kw: Any) -> Device:
        return Device(f"dm-{minor}", f"/dev/dm-{minor}", major, minor)

    monkeypatch.setattr(devnode, "wait_for_device", fake_wait)
    monkeypatch.setattr(devnode, "kernel_name", lambda major, minor, *a: f"dm-{minor}")
    monkeypatch.setattr(devnode, "find_dm_by_name", by_dm_name)
    monkeypatch.setattr(devnode, "scan_dm_by_name", lambda name, *a: (by_dm_name(name), lvm.sysfs_sure))
    monkeypatch.setattr(wipe, "zero_out", lambda path, stop=None: lvm.calls.append(("zero_out", path)))
