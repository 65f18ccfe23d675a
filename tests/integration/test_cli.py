"""The elv command line against a real driver: volume commands, hot-plug into
namespaces the test makes itself (no Docker engine here), doctor, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support import observe
from tests.support.driver import Driver, leftovers
from tests.support.paths import REPO


def elv(d: Driver, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CSI_ENDPOINT=d.endpoint, PYTHONPATH=REPO)
    r = subprocess.run(
        [sys.executable, "-m", "csi", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    if check:
        assert r.returncode == 0, f"elv {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def plain_ns() -> Iterator[int]:
    """A process in its own mount namespace (private propagation), like `unshare -m`."""
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{p.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read()


@pytest.fixture
def container(base: str) -> Iterator[tuple[int, str]]:
    """A container-like process: own mount namespace and a pivot_root'ed root,
    so paths inside it are not host paths."""
    root = os.path.join(base, "rootfs")
    script = f"""
set -e
mount -t tmpfs ctr {root}
mkdir -p {root}/usr {root}/proc {root}/old {root}/etc
for d in usr bin lib lib64 sbin; do
  if [ -L /$d ]; then ln -s "$(readlink /$d)" {root}/$d; elif [ -d /$d ]; then mkdir -p {root}/$d; mount --bind /$d {root}/$d; fi
done
cd {root}
pivot_root . old
mount -t proc proc /proc
umount -l /old
rmdir /old
exec sleep 600
"""
    os.makedirs(root)
    p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script])
    try:
        deadline = time.monotonic() + 10
        while "sleep" not in _cmdline(p.pid):
            assert p.poll() is None, "the container failed to start"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        yield p.pid, root
    finally:
        p.kill()
        p.wait()


def test_volume_commands(driver: Driver) -> None:
    out = elv(driver, "volume", "create", "db", "--size", "64Mi").stdout
    assert "created volume db" in out
    listed = json.loads(elv(driver, "volume", "list", "--json").stdout)
    assert [(v["name"], v["size"], v["access"], v["fs"]) for v in listed] == [("db", 64 * 2**20, "mount", "ext4")]
    elv(driver, "volume", "create", "raw", "--size", "16Mi", "--block")
    shown = json.loads(elv(driver, "volume", "show", "raw", "--json").stdout)
    assert shown["access"] == "block" and shown["attached"] == [] and shown["condition"] == "ok"
    assert "1 GiB" in elv(driver, "volume", "expand", "db", "--size", "1Gi").stdout
    elv(driver, "volume", "snapshot", "db", "nightly")
    assert len(json.loads(elv(driver, "volume", "show", "db", "--json").stdout)["snapshots"]) == 1
    elv(driver, "volume", "create", "restored", "--size", "1Gi", "--from-snapshot", "nightly")
    elv(driver, "volume", "clone", "db", "db-copy")
    names = sorted(v["name"] for v in json.loads(elv(driver, "volume", "list", "--json").stdout))
    assert names == ["db", "db-copy", "raw", "restored"]
    # Clear errors that say what to do.
    r = elv(driver, "volume", "show", "nope", check=False)
    assert r.returncode == 1 and "no volume named 'nope'" in r.stderr and "elv volume list" in r.stderr
    r = elv(driver, "volume", "create", "big", "--size", "1Pi", check=False)
    assert r.returncode == 1 and "RESOURCE_EXHAUSTED" in r.stderr and "free space" in r.stderr
    r = elv(driver, "volume", "create", "x", "--size", "lots", check=False)
    assert r.returncode == 1 and "cannot read size" in r.stderr
    for name in ("db-copy", "restored", "raw"):
        elv(driver, "volume", "delete", name)
    elv(driver, "volume", "snapshot", "db", "nightly", "--delete")
    # Deleted and made again, a name is a new volume: the old one's ID and
    # snapshots are not the new one's (a loop snapshot outlives its source).
    old_id = json.loads(elv(driver, "volume", "show", "db", "--json").stdout)["id"]
    elv(driver, "volume", "snapshot", "db", "weekly")
    elv(driver, "volume", "delete", "db")
    elv(driver, "volume", "create", "db", "--size", "64Mi")
    shown = json.loads(elv(driver, "volume", "show", "db", "--json").stdout)
    assert shown["id"] != old_id and shown["snapshots"] == []
    elv(driver, "volume", "snapshot", "db", "weekly", "--delete")  # found by its name alone
    r = elv(driver, "volume", "snapshot", "db", "weekly", "--delete", check=False)
    assert r.returncode == 1 and "no snapshot named 'weekly'" in r.stderr
    elv(driver, "volume", "delete", "db")
    assert json.loads(elv(driver, "volume", "list", "--json").stdout) == []


def test_no_driver_says_how_to_start_one(base: str) -> None:
    d = Driver(base)  # never started
    r = elv(d, "volume", "list", check=False)
    assert r.returncode == 1
    assert "no ELV driver answers" in r.stderr and "elv serve --endpoint" in r.stderr


def test_attach_into_plain_namespace(driver: Driver, plain_ns: int) -> None:
    elv(driver, "volume", "create", "hot", "--size", "320Mi", "--fs", "xfs")
    inside = os.path.join(driver.base, "ns-data")
    elv(driver, "attach", "hot", "--pid", str(plain_ns), "--path", inside)
    subprocess.run(["nsenter", "-t", str(plain_ns), "-m", "sh", "-c", f"echo hot > {inside}/f"], check=True)
    assert observe.top(inside, plain_ns) is not None
    assert observe.top(inside) is None, "the mount must not appear on the host"
    # The driver knows it is in use.
    assert elv(driver, "volume", "delete", "hot", check=False).returncode == 1
    shown = json.loads(elv(driver, "volume", "show", "hot", "--json").stdout)
    assert shown["attached"][0]["pids"] == [plain_ns]
    # Online growth while attached, visible inside the namespace.
    elv(driver, "volume", "expand", "hot", "--size", "640Mi")
    df = subprocess.run(
        ["nsenter", "-t", str(plain_ns), "-m", "df", "-B1", "--output=size", inside],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert int(df[-1]) > 500 * 2**20, "grew from 448 MiB"
    elv(driver, "detach", "hot", "--pid", str(plain_ns))
    assert observe.top(inside, plain_ns) is None
    assert leftovers(driver.base) == []
    # The data survived: attach again, read-only this time.
    elv(driver, "attach", "hot", "--pid", str(plain_ns), "--path", inside, "--readonly")
    r = subprocess.run(
        ["nsenter", "-t", str(plain_ns), "-m", "sh", "-c", f"cat {inside}/f; touch {inside}/g"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.stdout.strip() == "hot" and r.returncode != 0 and "Read-only" in r.stderr
    elv(driver, "detach", "hot", "--pid", str(plain_ns), "--path", inside)
    elv(driver, "volume", "delete", "hot")


def test_attach_into_container_root(driver: Driver, container: tuple[int, str]) -> None:
    pid, _ = container
    elv(driver, "volume", "create", "ctr", "--size", "64Mi")
    elv(driver, "attach", "ctr", "--pid", str(pid), "--path", "/data")
    subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "sh", "-c", "echo in-container > /data/f"], check=True)
    assert observe.top("/data", pid) is not None
    assert not os.path.exists("/data/f"), "the path is inside the container, never the host's /data"
    # A symlink inside the container is refused.
    subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "ln", "-s", "/etc", "/sneaky"], check=True)
    r = elv(driver, "attach", "ctr", "--pid", str(pid), "--path", "/sneaky", check=False)
    assert r.returncode == 1 and "symlink" in r.stderr
    r = elv(driver, "attach", "ctr", "--pid", str(pid), "--path", "/sneaky/x", check=False)
    assert r.returncode == 1 and "symlink" in r.stderr
    # Attaching into the host's own namespace is refused.
    r = elv(driver, "attach", "ctr", "--pid", str(os.getpid()), "--path", "/data", check=False)
    assert r.returncode == 1 and "host's mount namespace" in r.stderr
    elv(driver, "detach", "ctr", "--pid", str(pid))
    assert observe.top("/data", pid) is None
    elv(driver, "volume", "delete", "ctr")


@pytest.fixture
def userns_ns() -> Iterator[int]:
    """A process in its own user and mount namespaces whose root is host uid
    100000 (a rootless container's map), written into uid_map by us as root."""
    p = subprocess.Popen(["unshare", "--user", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 5
        while os.stat(f"/proc/{p.pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for m in ("uid_map", "gid_map"):
            with open(f"/proc/{p.pid}/{m}", "w") as f:
                f.write("0 100000 65536\n")
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _as_ns_root(pid: int, script: str) -> subprocess.CompletedProcess[str]:
    """Run as root *of the namespace* (host uid 100000): nsenter -U sets uid 0 inside."""
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-U", "-m", "sh", "-c", script], capture_output=True, text=True, check=False
    )


def _idmapped(pid: int, path: str) -> bool:
    with open(f"/proc/{pid}/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == path)
    return "idmapped" in line.split()[5].split(",")


def test_attach_into_another_user_namespace_is_idmapped(driver: Driver, userns_ns: int) -> None:
    pid = userns_ns
    elv(driver, "volume", "create", "rootless", "--size", "64Mi")
    vid = json.loads(elv(driver, "volume", "list", "--json").stdout)[0]["id"]
    inside = os.path.join(driver.base, "uns-data")
    os.chmod(driver.base, 0o711)  # the namespace's root is host uid 100000: let it walk to the mount
    out = elv(driver, "attach", "rootless", "--pid", str(pid), "--path", inside).stdout
    assert "idmapped to its user namespace" in out
    assert _idmapped(pid, inside)
    r = _as_ns_root(
        pid, f"id -u; stat -c %u:%g {inside}; echo hi > {inside}/by-root; mkdir {inside}/d; chown 1000:1000 {inside}/d"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "0:0"], "uid 0 on disk is the namespace's root"
    # On disk (the host's staging mount of the volume): the namespace's root wrote as uid 0.
    staging = driver.path("plugins", "elv.csi.dev", "attach", vid, "staging")
    assert (os.stat(f"{staging}/by-root").st_uid, os.stat(f"{staging}/by-root").st_gid) == (0, 0)
    assert (os.stat(f"{staging}/d").st_uid, os.stat(f"{staging}/d").st_gid) == (1000, 1000)
    elv(driver, "detach", "rootless", "--pid", str(pid))
    # Without the idmap the same files belong to nobody inside, and its root cannot write.
    out = elv(driver, "attach", "rootless", "--pid", str(pid), "--path", inside, "--idmap", "none").stdout
    assert "idmapped" not in out and not _idmapped(pid, inside)
    r = _as_ns_root(pid, f"stat -c %u:%g {inside}/by-root; touch {inside}/again")
    assert r.stdout.split() == ["65534:65534"] and r.returncode != 0, (r.stdout, r.stderr)
    elv(driver, "detach", "rootless", "--pid", str(pid))
    # A process in our own user namespace gets no idmap with auto.
    assert leftovers(driver.base) == []
    elv(driver, "volume", "delete", "rootless")


def test_attach_block_volume(driver: Driver, plain_ns: int) -> None:
    elv(driver, "volume", "create", "blk", "--size", "8Mi", "--block")
    inside = os.path.join(driver.base, "ns-dev")
    elv(driver, "attach", "blk", "--pid", str(plain_ns), "--path", inside)
    out = subprocess.run(
        ["nsenter", "-t", str(plain_ns), "-m", "blockdev", "--getsize64", inside],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) == 8 * 2**20
    elv(driver, "detach", "blk", "--pid", str(plain_ns))
    elv(driver, "volume", "delete", "blk")


def _dm_opens() -> str | None:
    """Whether device-mapper works here, asked the kernel ourselves: None, or why not."""
    try:
        os.close(os.open("/dev/mapper/control", os.O_RDWR))
        return None
    except OSError as e:
        return e.strerror


def test_doctor(driver: Driver) -> None:
    r = elv(driver, "doctor", "--endpoint", driver.endpoint, "--loop-dir", driver.pool)
    assert "[ok  ] the driver answers Probe: elv.csi.dev 0.1.0 (ready)" in r.stdout
    assert f"[ok  ] loop pool {driver.pool} takes new files" in r.stdout
    assert "[ok  ] mkfs.xfs: mkfs.xfs version" in r.stdout and "[ok  ] losetup: losetup from util-linux" in r.stdout
    assert "[ok  ] xfs filesystem (the kernel mounts it)" in r.stdout
    why = _dm_opens()
    if why is None:
        assert "[ok  ] device-mapper (ioctl interface 4." in r.stdout
    else:
        # This CI machine: /dev/mapper/control exists, and opening it fails with ENODEV.
        assert f"[warn] device-mapper: /dev/mapper/control does not open: {why}" in r.stdout, r.stdout
        lvm = elv(driver, "doctor", "--backend", "lvm", "--endpoint", driver.endpoint, check=False)
        assert lvm.returncode == 1 and "[FAIL] device-mapper: /dev/mapper/control does not open" in lvm.stdout
    assert os.listdir(driver.pool) != [] and not [n for n in os.listdir(driver.pool) if "doctor" in n]
    r = elv(driver, "doctor", "--endpoint", "unix:///nonexistent.sock", check=True)
    assert "fix: start the driver" in r.stdout


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_metrics(base: str) -> None:
    port = free_port()
    d = Driver(base, "--metrics-address", f"127.0.0.1:{port}").start()
    try:
        elv(d, "volume", "create", "m", "--size", "32Mi")
        elv(d, "volume", "show", "nope", check=False)
        staging = d.path("st")
        vid = json.loads(elv(d, "volume", "list", "--json").stdout)[0]["id"]
        d.stage(vid, staging)
        deadline = time.monotonic() + 15
        while True:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            if 'elv_volumes{pool="loop"} 1.0' in text or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert 'elv_rpc_total{code="OK",method="CreateVolume"} 1.0' in text
        assert 'elv_rpc_duration_seconds_count{method="NodeStageVolume"} 1.0' in text
        assert 'elv_command_duration_seconds_count{command="mkfs.ext4"} 1.0' in text
        assert 'elv_volumes{pool="loop"} 1.0' in text
        assert (
            "elv_pool_size_bytes" in text
            and "elv_pool_available_bytes" in text
            and "elv_operations_in_flight 0.0" in text
        )
        # Every metric the Grafana dashboard plots is one the driver exports.
        import re

        with open(os.path.join(REPO, "deploy", "grafana", "elv-dashboard.json")) as f:
            wanted = set(re.findall(r"elv_[a-z_]+", f.read()))
        exported = set(re.findall(r"^# TYPE (elv_[a-z_]+)", text, re.M))
        missing = {w for w in wanted if w.removesuffix("_bucket") not in exported}
        assert not missing, missing
        d.unstage(vid, staging)
        elv(d, "volume", "delete", "m")
    finally:
        assert d.stop() == 0
    assert leftovers(base) == []


def test_sigterm_while_serving_metrics(base: str) -> None:
    d = Driver(base, "--metrics-address", f"127.0.0.1:{free_port()}").start()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=15) == 0
    d.proc = None
