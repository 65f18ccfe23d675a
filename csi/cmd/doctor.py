"""``elv doctor``: check this host for what ELV needs, and say how to fix it."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import stat
import subprocess
from dataclasses import dataclass

from csi.host.fs import CAP_SYS_RESOURCE, has_capability

CAP_SYS_ADMIN = 21
TOOLS = {
    # tool: (package, version argv, needed for)
    "losetup": ("util-linux", ["--version"], "loop"),
    "blkid": ("util-linux", ["-V"], "all"),
    "fsfreeze": ("util-linux", ["--version"], "all"),
    "mkfs.ext4": ("e2fsprogs", ["-V"], "all"),
    "resize2fs": ("e2fsprogs", [], "all"),
    "e2fsck": ("e2fsprogs", ["-V"], "all"),
    "mkfs.xfs": ("xfsprogs", ["-V"], "all"),
    "xfs_growfs": ("xfsprogs", ["-V"], "all"),
    "cp": ("coreutils", ["--version"], "loop"),
    "lvm": ("lvm2", ["version"], "lvm"),
}


@dataclass
class Check:
    ok: bool
    what: str
    fix: str = ""
    warn: bool = False


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], endpoint: str) -> None:
    p = sub.add_parser("doctor", help="check this host for what ELV needs")
    p.add_argument("--endpoint", default=endpoint)
    p.add_argument("--backend", choices=["loop", "lvm"], default="loop")
    p.add_argument("--loop-dir", default="/var/lib/elv/loop")
    p.add_argument("--lvm-vg", default=None)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def kernel(backend: str) -> list[Check]:
    out = []
    fs = {line.split()[-1] for line in _read("/proc/filesystems").splitlines() if line.strip()}
    loop = os.path.exists("/dev/loop-control")
    out.append(
        Check(loop, "loop devices (/dev/loop-control)", "load the module: modprobe loop", warn=backend != "loop")
    )
    dm = "device-mapper" in _read("/proc/misc") or os.path.exists("/dev/mapper/control")
    out.append(
        Check(
            dm,
            "device-mapper",
            "load it (modprobe dm_mod) or use a kernel with CONFIG_BLK_DEV_DM; without it only the loop backend works",
            warn=backend != "lvm",
        )
    )
    for name in ("ext4", "xfs"):
        out.append(Check(name in fs, f"{name} filesystem", f"modprobe {name}"))
    return out


def tools(backend: str) -> list[Check]:
    out = []
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for tool, (pkg, vargs, needed) in TOOLS.items():
        exe = shutil.which(tool, path=path)
        relevant = needed in ("all", backend)
        if exe is None:
            out.append(Check(False, f"{tool} is missing", f"apt-get install {pkg}", warn=not relevant))
            continue
        version = ""
        if vargs:
            r = subprocess.run(
                [exe, *vargs], capture_output=True, text=True, timeout=10, check=False, env={"LC_ALL": "C"}
            )
            version = ((r.stdout or r.stderr).strip().splitlines() or [""])[0][:70]
        out.append(Check(True, f"{tool}: {version or exe}"))
    return out


def privileges() -> list[Check]:
    return [
        Check(os.geteuid() == 0, "running as root", "run the driver as root (the node plugin is privileged)"),
        Check(has_capability(CAP_SYS_ADMIN), "CAP_SYS_ADMIN (mount, loop devices)", "run privileged"),
        Check(
            has_capability(CAP_SYS_RESOURCE),
            "CAP_SYS_RESOURCE (online ext4 growth)",
            "run privileged, or use xfs; ext4 volumes then grow at their next stage",
            warn=True,
        ),
    ]


def pool(args: argparse.Namespace) -> list[Check]:
    if args.backend == "lvm":
        if not args.lvm_vg:
            return [Check(False, "no volume group given", "pass --lvm-vg VG", warn=True)]
        r = subprocess.run(
            ["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_free,vg_size", args.lvm_vg],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return [
            Check(
                r.returncode == 0,
                f"volume group {args.lvm_vg}: {r.stdout.strip()[:120] or r.stderr.strip()[:120]}",
                f"create it: vgcreate {args.lvm_vg} /dev/DISK",
            )
        ]
    d = args.loop_dir
    probe = d
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    st = os.statvfs(probe)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    pct = 100 * free / total if total else 0
    return [
        Check(
            os.path.isdir(d), f"loop pool {d} exists", f"it is created at the first start; or mkdir -p {d}", warn=True
        ),
        Check(
            pct >= 10,
            f"pool filesystem: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB ({pct:.0f}%)",
            "free space on the pool's filesystem or point --loop-dir elsewhere",
            warn=pct >= 2,
        ),
    ]


def endpoint(ep: str) -> list[Check]:
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
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(path)
        out.append(Check(True, "a driver answers on the socket"))
    except OSError as e:
        out.append(
            Check(False, f"nothing answers on {path} ({e.strerror})", f"start the driver: elv serve --endpoint {ep}")
        )
    finally:
        s.close()
    return out


def run(args: argparse.Namespace) -> int:
    sections = {
        "kernel": kernel(args.backend),
        "tools": tools(args.backend),
        "privileges": privileges(),
        "pool": pool(args),
        "socket": endpoint(args.endpoint),
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
