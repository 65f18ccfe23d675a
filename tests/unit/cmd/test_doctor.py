"""elv doctor's checks over a fake host: each one asks (opens, ioctls, mounts,
runs), and a file that exists proves nothing."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest

from csi.cmd import doctor
from csi.cmd.doctor import Check


def oserror(code: int) -> OSError:
    import os

    return OSError(code, os.strerror(code))


class FakeHost(doctor.Host):
    def __init__(self) -> None:
        self.devices: dict[str, OSError | None] = {doctor.LOOP_CONTROL: None}
        self.dm: str | OSError = "4.48.0"
        self.fs: dict[str, bool | OSError] = {"ext4": True, "xfs": True}
        self.registered = {"ext4", "xfs"}
        self.tools: dict[str, tuple[int, str] | OSError | None] = {}
        self.ran: list[list[str]] = []

    def open_device(self, path: str) -> None:
        e = self.devices.get(path, oserror(errno.ENOENT))
        if e is not None:
            raise e

    def dm_version(self) -> str:
        if isinstance(self.dm, OSError):
            raise self.dm
        return self.dm

    def filesystem_known(self, fstype: str) -> bool:
        r = self.fs[fstype]
        if isinstance(r, OSError):
            raise r
        return r

    def registered_filesystems(self) -> set[str]:
        return self.registered

    def which(self, tool: str) -> str | None:
        return None if self.tools.get(tool, (0, "")) is None else f"/usr/sbin/{tool}"

    def run(self, argv: list[str]) -> tuple[int, str]:
        self.ran.append(argv)
        r = self.tools.get(argv[0].rsplit("/", 1)[1])
        if isinstance(r, OSError):
            raise r
        if r is None or r == (0, ""):
            tool = argv[0].rsplit("/", 1)[1]
            return 0, GOOD[tool]
        return r


GOOD = {
    "losetup": "losetup from util-linux 2.38.1",
    "blkid": "blkid from util-linux 2.38.1  (libblkid 2.38.1, 04-Aug-2022)",
    "fsfreeze": "fsfreeze from util-linux 2.38.1",
    "mkfs.ext4": "mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library version 1.47.0",
    "resize2fs": "resize2fs 1.47.0 (5-Feb-2023)\nUsage: resize2fs [-d debug_flags] device",
    "e2fsck": "e2fsck 1.47.0 (5-Feb-2023)",
    "mkfs.xfs": "mkfs.xfs version 6.1.0",
    "xfs_growfs": "xfs_growfs version 6.1.0",
    "cp": "cp (GNU coreutils) 9.1",
    "lvm": "  LVM version:     2.03.16(2) (2022-05-18)",
}


def by_prefix(checks: list[Check], prefix: str) -> Check:
    (c,) = [c for c in checks if c.what.startswith(prefix)]
    return c


def test_device_mapper_whose_node_exists_but_does_not_open_is_missing() -> None:
    # This CI machine: /dev/mapper/control is there, and open() says ENODEV.
    host = FakeHost()
    host.dm = oserror(errno.ENODEV)
    dm = by_prefix(doctor.kernel("loop", host), "device-mapper")
    assert not dm.ok and dm.warn, "the loop backend does not need it"
    assert dm.what == (
        "device-mapper: /dev/mapper/control does not open: No such device (the kernel has no device-mapper)"
    )
    assert "modprobe dm_mod" in dm.fix
    lvm = by_prefix(doctor.kernel("lvm", host), "device-mapper")
    assert not lvm.ok and not lvm.warn, "the lvm backend cannot work without it"


def test_device_mapper_answering_its_version_ioctl_is_ok() -> None:
    dm = by_prefix(doctor.kernel("lvm", FakeHost()), "device-mapper")
    assert dm.ok and dm.what == "device-mapper (ioctl interface 4.48.0)"


def test_device_mapper_that_opens_but_fails_the_ioctl_is_not_ok() -> None:
    host = FakeHost()
    host.dm = oserror(errno.EACCES)
    dm = by_prefix(doctor.kernel("lvm", host), "device-mapper")
    assert not dm.ok and dm.what == "device-mapper: /dev/mapper/control fails: Permission denied"


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENXIO, errno.ENOENT, errno.EACCES])
def test_loop_control_must_open(code: int) -> None:
    host = FakeHost()
    host.devices[doctor.LOOP_CONTROL] = oserror(code)
    loop = by_prefix(doctor.kernel("loop", host), "loop devices")
    assert not loop.ok and not loop.warn
    assert loop.what.startswith("loop devices: opening /dev/loop-control fails: ")
    assert by_prefix(doctor.kernel("loop", FakeHost()), "loop devices").ok


def test_filesystems_are_probed_by_mount_and_fall_back_without_privilege() -> None:
    host = FakeHost()
    host.fs["xfs"] = False
    checks = doctor.kernel("loop", host)
    assert by_prefix(checks, "ext4").ok
    xfs = by_prefix(checks, "xfs")
    assert not xfs.ok and xfs.fix == "modprobe xfs"
    host.fs = {"ext4": PermissionError(errno.EPERM, "no"), "xfs": PermissionError(errno.EPERM, "no")}
    host.registered = {"ext4"}
    checks = doctor.kernel("loop", host)
    assert by_prefix(checks, "ext4").ok and "/proc/filesystems" in by_prefix(checks, "ext4").what
    assert not by_prefix(checks, "xfs").ok


def test_tools_are_run_and_must_answer_as_themselves() -> None:
    host = FakeHost()
    host.tools["mkfs.xfs"] = None  # not installed
    host.tools["blkid"] = (127, "/usr/sbin/blkid: error while loading shared libraries: libblkid.so.1")
    host.tools["fsfreeze"] = OSError(errno.ENOEXEC, "Exec format error")
    host.tools["lvm"] = None  # only the lvm backend needs it
    checks = doctor.tools("loop", host)
    missing = by_prefix(checks, "mkfs.xfs")
    assert (missing.ok, missing.warn, missing.fix) == (False, False, "apt-get install xfsprogs")
    broken = by_prefix(checks, "blkid")
    assert not broken.ok and "does not answer as blkid does (exit 127)" in broken.what
    assert broken.fix == "reinstall util-linux"
    assert not by_prefix(checks, "fsfreeze").ok and "does not run" in by_prefix(checks, "fsfreeze").what
    assert by_prefix(checks, "lvm").warn
    ok = by_prefix(checks, "resize2fs")
    assert ok.ok and ok.what == "resize2fs: resize2fs 1.47.0 (5-Feb-2023)"
    assert ["/usr/sbin/resize2fs"] in host.ran, "resize2fs has no version flag: it is run bare"


def test_a_pool_must_take_a_file(tmp_path: Path) -> None:
    class ReadOnly(FakeHost):
        def write_probe(self, directory: str) -> None:
            raise oserror(errno.EROFS)

    args = argparse.Namespace(backend="loop", loop_dir=str(tmp_path), lvm_vg=None)
    writable, _space = doctor.pool(args, FakeHost())
    assert writable.ok
    ro, _ = doctor.pool(args, ReadOnly())
    assert not ro.ok and "Read-only file system" in ro.what
    missing, _ = doctor.pool(
        argparse.Namespace(backend="loop", loop_dir=str(tmp_path / "a" / "b"), lvm_vg=None), FakeHost()
    )
    assert not missing.ok and missing.warn and "does not exist yet" in missing.what
    relative, _ = doctor.pool(argparse.Namespace(backend="loop", loop_dir="no-such-pool", lvm_vg=None), FakeHost())
    assert not relative.ok


def test_the_real_write_probe_leaves_nothing(tmp_path: Path) -> None:
    doctor.Host().write_probe(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
