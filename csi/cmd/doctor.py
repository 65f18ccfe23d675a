"""``elv doctor``: check this host for what ELV needs, and say how to fix it.

Every check asks the kernel or runs the thing, never looks for a file: a
device node can exist while its driver is missing (this project's CI kernel
has /dev/mapper/control, and opening it fails with ENODEV), and a tool can be
on the PATH and not run. So device-mapper is the DM_VERSION ioctl on an open
/dev/mapper/control, loop devices an open /dev/loop-control, a filesystem a
mount(2) that the kernel answers with ENODEV only for a type it does not know,
each tool its own version output, the pool a file made in it, the socket a
CSI Probe. :class:`Host` does the asking, so tests can stand in for it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from dataclasses import dataclass

import grpc

from csi.host.fs import CAP_SYS_RESOURCE, has_capability
from csi.v1 import csi_pb2, csi_pb2_grpc

CAP_SYS_ADMIN = 21
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: tool: (package, version argv, what its output starts with, needed for)
TOOLS: dict[str, tuple[str, list[str], str, str]] = {
    "losetup": ("util-linux", ["--version"], r"losetup from util-linux", "loop"),
    "blkid": ("util-linux", ["-V"], r"blkid from util-linux", "all"),
    "fsfreeze": ("util-linux", ["--version"], r"fsfreeze from util-linux", "all"),
    "mkfs.ext4": ("e2fsprogs", ["-V"], r"mke2fs \d", "all"),
    "resize2fs": ("e2fsprogs", [], r"resize2fs \d", "all"),  # no version flag: its usage starts with it
    "e2fsck": ("e2fsprogs", ["-V"], r"e2fsck \d", "all"),
    "mkfs.xfs": ("xfsprogs", ["-V"], r"mkfs\.xfs version", "all"),
    "xfs_growfs": ("xfsprogs", ["-V"], r"xfs_growfs version", "all"),
    "cp": ("coreutils", ["--version"], r"cp \(GNU coreutils\)", "loop"),
    "lvm": ("lvm2", ["version"], r"\s*LVM version:", "lvm"),
}
# struct dm_ioctl (linux/dm-ioctl.h) is 312 bytes; DM_VERSION = _IOWR(0xfd, 0, struct dm_ioctl).
DM_IOCTL_SIZE = 312
DM_VERSION = (3 << 30) | (DM_IOCTL_SIZE << 16) | (0xFD << 8) | 0
DM_CONTROL = "/dev/mapper/control"
LOOP_CONTROL = "/dev/loop-control"
MS_RDONLY = 1
MS_SILENT = 32768

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass
class Check:
    ok: bool
    what: str
    fix: str = ""
    warn: bool = False


class Host:
    """Asks the real host. Each method returns what it learned or raises OSError."""

    def open_device(self, path: str) -> None:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def dm_version(self) -> str:
        fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            buf = bytearray(DM_IOCTL_SIZE)
            struct.pack_into("<3III", buf, 0, 4, 0, 0, DM_IOCTL_SIZE, DM_IOCTL_SIZE)
            fcntl.ioctl(fd, DM_VERSION, buf)
            return ".".join(str(v) for v in struct.unpack_from("<3I", buf, 0))
        finally:
            os.close(fd)

    def filesystem_known(self, fstype: str) -> bool:
        """Whether the kernel knows (or loads on demand) a filesystem type.

        A mount of a source that cannot exist fails with ENODEV only when the
        type is unknown (after the kernel tried to load its module); a known
        type fails on the source instead. Needs CAP_SYS_ADMIN (EPERM otherwise).
        """
        target = tempfile.mkdtemp(prefix="doctor-probe-")
        source = os.path.join(target, "no-such-device")  # inside a directory just made empty: never a device
        try:
            rc = _libc.mount(source.encode(), target.encode(), fstype.encode(), MS_RDONLY | MS_SILENT, None)
            if rc == 0:  # cannot happen with that source, but never leave a mount behind
                _libc.umount2(target.encode(), 2)
                return True
            err = ctypes.get_errno()
            if err == errno.EPERM:
                raise PermissionError(err, os.strerror(err))
            return err != errno.ENODEV
        finally:
            os.rmdir(target)

    def registered_filesystems(self) -> set[str]:
        with open("/proc/filesystems", encoding="utf-8") as f:
            return {line.split()[-1] for line in f if line.strip()}

    def which(self, tool: str) -> str | None:
        return shutil.which(tool, path=TOOL_PATH)

    def run(self, argv: list[str]) -> tuple[int, str]:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, env={"LC_ALL": "C"})
        return r.returncode, (r.stdout + r.stderr).strip()

    def euid(self) -> int:
        return os.geteuid()

    def capability(self, cap: int) -> bool:
        return has_capability(cap)

    def write_probe(self, directory: str) -> None:
        """Make (and drop) a file in ``directory``: an unnamed O_TMPFILE where the
        filesystem has them, so nothing is ever left, even by a crash."""
        try:
            os.close(os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR):
                raise
            fd, path = tempfile.mkstemp(prefix=".elv-doctor-", dir=directory)
            os.close(fd)
            os.unlink(path)

    def probe_driver(self, endpoint: str) -> str:
        """The driver's name and version, once it answered Probe."""
        with grpc.insecure_channel(endpoint) as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
            info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        ready = "ready" if not probe.HasField("ready") or probe.ready.value else "NOT ready"
        return f"{info.name} {info.vendor_version} ({ready})"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], endpoint: str) -> None:
    p = sub.add_parser("doctor", help="check this host for what ELV needs")
    p.add_argument("--endpoint", default=endpoint)
    p.add_argument("--backend", choices=["loop", "lvm"], default="loop")
    p.add_argument("--loop-dir", default="/var/lib/elv/loop")
    p.add_argument("--lvm-vg", default=None)


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def kernel(backend: str, host: Host) -> list[Check]:
    out = []
    try:
        host.open_device(LOOP_CONTROL)
        out.append(Check(True, f"loop devices ({LOOP_CONTROL} opens)"))
    except OSError as e:
        out.append(
            Check(
                False,
                f"loop devices: opening {LOOP_CONTROL} fails: {_why(e)}",
                "load the module: modprobe loop",
                warn=backend != "loop",
            )
        )
    try:
        out.append(Check(True, f"device-mapper (ioctl interface {host.dm_version()})"))
    except OSError as e:
        missing = e.errno in (errno.ENODEV, errno.ENXIO, errno.ENOENT)
        out.append(
            Check(
                False,
                f"device-mapper: {DM_CONTROL} {'does not open' if missing else 'fails'}: {_why(e)}"
                + (" (the kernel has no device-mapper)" if missing else ""),
                "load it (modprobe dm_mod) or use a kernel with CONFIG_BLK_DEV_DM; without it only the loop backend works",
                warn=backend != "lvm",
            )
        )
    out += [_filesystem(name, host) for name in ("ext4", "xfs")]
    return out


def _filesystem(name: str, host: Host) -> Check:
    try:
        known = host.filesystem_known(name)
        how = "the kernel mounts it"
    except OSError:
        # Not allowed to probe with mount(2) (not root): the kernel's list of loaded types.
        known = name in host.registered_filesystems()
        how = "registered in /proc/filesystems; run as root to probe it"
    if known:
        return Check(True, f"{name} filesystem ({how})")
    return Check(False, f"{name} filesystem: the kernel does not know it", f"modprobe {name}")


def tools(backend: str, host: Host) -> list[Check]:
    out = []
    for tool, (pkg, vargs, expect, needed) in TOOLS.items():
        relevant = needed in ("all", backend)
        exe = host.which(tool)
        if exe is None:
            out.append(Check(False, f"{tool} is missing", f"apt-get install {pkg}", warn=not relevant))
            continue
        try:
            rc, output = host.run([exe, *vargs])
        except (OSError, subprocess.SubprocessError) as e:
            out.append(Check(False, f"{tool} ({exe}) does not run: {e}", f"reinstall {pkg}", warn=not relevant))
            continue
        first = next((ln.strip() for ln in output.splitlines() if re.match(expect, ln)), None)
        if first is None:
            said = (output.splitlines() or ["no output"])[0][:70]
            out.append(
                Check(
                    False,
                    f"{tool} ({exe}) does not answer as {tool} does (exit {rc}): {said}",
                    f"reinstall {pkg}",
                    warn=not relevant,
                )
            )
            continue
        out.append(Check(True, f"{tool}: {first[:70]}"))
    return out


def privileges(host: Host) -> list[Check]:
    return [
        Check(host.euid() == 0, "running as root", "run the driver as root (the node plugin is privileged)"),
        Check(host.capability(CAP_SYS_ADMIN), "CAP_SYS_ADMIN (mount, loop devices)", "run privileged"),
        Check(
            host.capability(CAP_SYS_RESOURCE),
            "CAP_SYS_RESOURCE (online ext4 growth)",
            "run privileged, or use xfs; ext4 volumes then grow at their next stage",
            warn=True,
        ),
    ]


def pool(args: argparse.Namespace, host: Host) -> list[Check]:
    if args.backend == "lvm":
        if not args.lvm_vg:
            return [Check(False, "no volume group given", "pass --lvm-vg VG", warn=True)]
        rc, output = host.run(
            ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_free,vg_size", args.lvm_vg]
        )
        return [
            Check(
                rc == 0, f"volume group {args.lvm_vg}: {output[:120]}", f"create it: vgcreate {args.lvm_vg} /dev/DISK"
            )
        ]
    d = os.path.abspath(args.loop_dir)
    probe = d
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    pct = 100 * free / total if total else 0
    space = Check(
        pct >= 10,
        f"pool filesystem: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB ({pct:.0f}%)",
        "free space on the pool's filesystem or point --loop-dir elsewhere",
        warn=pct >= 2,
    )
    if probe != d:
        return [
            Check(
                False,
                f"loop pool {d} does not exist yet",
                f"it is created at the first start; or mkdir -p {d}",
                warn=True,
            ),
            space,
        ]
    try:
        host.write_probe(d)
        writable = Check(True, f"loop pool {d} takes new files")
    except OSError as e:
        writable = Check(
            False, f"loop pool {d}: cannot make a file in it: {_why(e)}", "check its permissions and filesystem"
        )
    return [writable, space]


def endpoint(ep: str, host: Host) -> list[Check]:
    path = ep[len("unix://") :] if ep.startswith("unix://") else ep
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [Check(False, f"no socket at {path}", f"start the driver: elv serve --endpoint {ep}", warn=True)]
    if not stat.S_ISSOCK(st.st_mode):
        return [Check(False, f"{path} is not a socket", "remove it, or choose another --endpoint")]
    mode = stat.S_IMODE(st.st_mode)
    out = [
        Check(mode & 0o007 == 0, f"socket {path} mode {mode:04o}", f"chmod 0600 {path} (the driver sets 0600 or 0660)")
    ]
    try:
        out.append(Check(True, f"the driver answers Probe: {host.probe_driver('unix://' + path)}"))
    except grpc.RpcError as e:
        detail = e.details() if isinstance(e, grpc.Call) else str(e)
        out.append(
            Check(
                False, f"no driver answers Probe on {path} ({detail})", f"start the driver: elv serve --endpoint {ep}"
            )
        )
    return out


def run(args: argparse.Namespace, host: Host | None = None) -> int:
    host = host or Host()
    sections = {
        "kernel": kernel(args.backend, host),
        "tools": tools(args.backend, host),
        "privileges": privileges(host),
        "pool": pool(args, host),
        "socket": endpoint(args.endpoint, host),
    }
    problems = 0
    for title, checks in sections.items():
        print(f"{title}:")
        for c in checks:
            mark = "ok  " if c.ok else ("warn" if c.warn else "FAIL")
            print(f"  [{mark}] {c.what}")
            if not c.ok:
                print(f"         fix: {c.fix}")
                problems += 0 if c.warn else 1
    print(f"\n{problems} problem(s) found" if problems else "\nno problems found")
    return 1 if problems else 0
