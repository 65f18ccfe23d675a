"""The server process: socket handling, signals, stuck commands, restarts."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest

from csi.v1 import csi_pb2
from tests.support.driver import Driver, MiB, leftovers
from tests.support.paths import REPO
from tests.support.rpc import code_of, mount_cap

SAFE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def test_socket_is_private_and_stale_socket_replaced(base: str) -> None:
    d = Driver(base).start()
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    d.kill()  # leaves a stale socket behind
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    d.start()
    assert d.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == "elv.csi.dev"
    assert d.stop() == 0
    assert not os.path.exists(d.socket), "SIGTERM removes the socket"


def test_regular_file_at_socket_path_is_refused_and_kept(base: str) -> None:
    d = Driver(base)
    with open(d.socket, "w") as f:
        f.write("precious")
    mtime = os.stat(d.socket).st_mtime_ns
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=15) != 0
    with open(d.socket) as f:
        assert f.read() == "precious"
    assert os.stat(d.socket).st_mtime_ns == mtime
    assert "not a socket" in d.log()
    d.proc = None


def test_live_socket_is_not_stolen(base: str) -> None:
    first = Driver(base).start()
    second = Driver(base)
    second.log_path = os.path.join(base, "second.log")
    second.start(wait=False)
    assert second.proc is not None and second.proc.wait(timeout=15) != 0
    second.proc = None
    assert "already serving" in second.log()
    assert first.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    assert first.stop() == 0


def test_csi_endpoint_environment(base: str) -> None:
    sock = os.path.join(base, "env.sock")
    argv = [
        sys.executable,
        "-m",
        "csi",
        "serve",
        "--loop-dir",
        os.path.join(base, "pool"),
        "--node-id",
        "n",
        "--kubelet-dir",
        base,
    ]
    proc = subprocess.Popen(
        argv, env=dict(os.environ, CSI_ENDPOINT="unix://" + sock, PYTHONPATH=REPO), cwd=REPO, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(sock)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()


def fake_tool(directory: str, name: str, flag: str) -> None:
    """A wrapper that blocks while ``flag`` exists, then runs the real tool."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nwhile [ -e {flag} ]; do sleep 0.05; done\nexec /usr/sbin/{name} "$@"\n')
    os.chmod(path, 0o755)


def test_hung_command_blocks_nothing_else(base: str) -> None:
    tools, flag = os.path.join(base, "tools"), os.path.join(base, "hang")
    os.makedirs(tools)
    fake_tool(tools, "mkfs.ext4", flag)
    d = Driver(base, "--tool-path", f"{tools}:{SAFE}").start()
    try:
        a = d.create("stuck")
        staging = d.path("st", "stuck")
        open(flag, "w").close()
        results: list[grpc.StatusCode] = []
        t = threading.Thread(target=lambda: results.append(code_of(d.stage, a, staging)))
        t.start()
        time.sleep(0.5)  # the stage is now inside the hung mkfs
        for call in (
            lambda: d.identity.Probe(csi_pb2.ProbeRequest(), timeout=1),
            lambda: d.controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=1),
            lambda: d.create("other"),
        ):
            t0 = time.monotonic()
            call()
            assert time.monotonic() - t0 < 1.0
        # Another operation on the busy volume is ABORTED at once, not queued.
        assert code_of(d.unstage, a, staging) == grpc.StatusCode.ABORTED
        # An identical retry (after the caller's deadline) joins the running stage.
        req = csi_pb2.NodeStageVolumeRequest(volume_id=a, staging_target_path=staging, volume_capability=mount_cap())
        assert code_of(d.node.NodeStageVolume, req, timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
        os.unlink(flag)
        t.join(timeout=30)
        assert results == [grpc.StatusCode.OK]
        d.node.NodeStageVolume(req)
        d.unstage(a, staging)
        for name in ("stuck", "other"):
            d.delete(d.create(name))
    finally:
        if os.path.exists(flag):
            os.unlink(flag)
        assert d.stop() == 0
    assert leftovers(base) == []


def test_command_timeout_kills_and_reports(base: str) -> None:
    tools, flag = os.path.join(base, "tools"), os.path.join(base, "hang")
    os.makedirs(tools)
    fake_tool(tools, "blkid", flag)
    d = Driver(base, "--tool-path", f"{tools}:{SAFE}", "--command-timeout", "1").start()
    try:
        vid = d.create("slow")
        staging = d.path("st", "slow")
        # Some data on it (not a filesystem): the driver cannot prove it blank and must probe.
        with open(os.path.join(d.pool, "volumes", vid + ".img"), "r+b") as f:
            f.seek(4 * MiB)
            f.write(b"x" * 4096)
        open(flag, "w").close()
        t0 = time.monotonic()
        assert code_of(d.stage, vid, staging) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 10
        assert "did not finish within 1s" in d.log()
        os.unlink(flag)
        assert leftovers(base) == [], "the failed stage detached its loop device"
        d.stage(vid, staging)
        d.unstage(vid, staging)
        d.delete(vid)
    finally:
        if os.path.exists(flag):
            os.unlink(flag)
        assert d.stop() == 0


def test_restart_recovers_half_made_state(base: str) -> None:
    d = Driver(base).start()
    vid = d.create("survivor")
    d.stop()
    vols, tmp = os.path.join(d.pool, "volumes"), os.path.join(d.pool, "tmp")
    orphan = os.path.join(vols, "v-loop-" + "a" * 32 + ".img")  # an image whose create never committed
    with open(orphan, "wb") as f:
        f.truncate(MiB)
    with open(os.path.join(vols, ".x.json.1234.tmp"), "w") as f:
        f.write("{")
    with open(os.path.join(tmp, "v-loop-" + "b" * 32 + ".partial"), "w") as f:
        f.write("half")
    d.start()
    assert sorted(os.listdir(vols)) == sorted([vid + ".img", vid + ".json"])
    assert os.listdir(tmp) == []
    assert "recovery: removed" in d.log()
    listed = [e.volume.volume_id for e in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert listed == [vid]
    d.delete(vid)
    assert d.stop() == 0


@pytest.mark.parametrize("mode,has_controller", [("node", False), ("controller", True)])
def test_modes(base: str, mode: str, has_controller: bool) -> None:
    d = Driver(base, "--mode", mode).start()
    caps = d.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert (csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE in services) == has_controller
    expected = grpc.StatusCode.OK if has_controller else grpc.StatusCode.UNIMPLEMENTED
    assert code_of(d.controller.ListVolumes, csi_pb2.ListVolumesRequest()) == expected
    node_expected = grpc.StatusCode.UNIMPLEMENTED if has_controller else grpc.StatusCode.OK
    assert code_of(d.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()) == node_expected
    assert d.stop() == 0


def test_socket_group_mode(base: str) -> None:
    import grp

    group = grp.getgrgid(0).gr_name if os.getgid() == 0 else grp.getgrgid(os.getgid()).gr_name
    d = Driver(base, "--socket-group", group).start()
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == grp.getgrnam(group).gr_gid
    assert d.stop() == 0


def test_request_flood_is_bounded(base: str) -> None:
    """Past --max-concurrent-rpcs the driver answers RESOURCE_EXHAUSTED at once
    instead of piling up work; Probe keeps answering once the flood passes."""
    tools, flag = os.path.join(base, "tools"), os.path.join(base, "hang")
    os.makedirs(tools)
    fake_tool(tools, "mkfs.ext4", flag)
    d = Driver(base, "--tool-path", f"{tools}:{SAFE}", "--max-concurrent-rpcs", "4").start()
    try:
        vids = [d.create(f"flood-{i}") for i in range(4)]
        open(flag, "w").close()
        results: list[grpc.StatusCode] = []
        threads = [
            threading.Thread(target=lambda v=v: results.append(code_of(d.stage, v, d.path("st", v))))  # type: ignore[misc]
            for v in vids
        ]
        for t in threads:
            t.start()
        time.sleep(0.5)  # four stages now hang in mkfs and fill every slot
        assert code_of(d.controller.ListVolumes, csi_pb2.ListVolumesRequest()) == grpc.StatusCode.RESOURCE_EXHAUSTED
        os.unlink(flag)
        for t in threads:
            t.join(30)
        assert results == [grpc.StatusCode.OK] * 4
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        for v in vids:
            d.unstage(v, d.path("st", v))
            d.delete(v)
    finally:
        if os.path.exists(flag):
            os.unlink(flag)
        assert d.stop() == 0
    assert leftovers(base) == []


def test_the_driver_runs_no_shell() -> None:
    """Every command goes through csi.host.runner as an argv list; nothing in the
    package may start a shell or build a command line from a string."""
    import ast
    import pathlib

    pkg = pathlib.Path(REPO) / "csi"
    offenders = []
    for path in pkg.rglob("*.py"):
        if "v1" in path.parts or "bench" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "shell" and getattr(node.value, "value", False) is True:
                offenders.append(f"{path}: shell=True")
            if isinstance(node, ast.Constant) and node.value in ("/bin/sh", "sh", "bash", "/bin/bash"):
                offenders.append(f"{path}: {node.value!r}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("system", "popen")
                and getattr(node.value, "id", "") == "os"
            ):
                offenders.append(f"{path}: os.{node.attr}")
    assert offenders == []


def test_restart_thaws_what_a_dead_driver_left_frozen(base: str) -> None:
    d = Driver(base).start()
    vid = d.create("frozen")
    staging = d.path("st", "frozen")
    d.stage(vid, staging)
    d.kill()
    # What a driver SIGKILLed in the middle of a group snapshot leaves: the
    # filesystem frozen (every writer would hang) and a marker naming it.
    subprocess.run(["fsfreeze", "--freeze", staging], check=True)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        marker = os.path.join(d.pool, "tmp", f"freeze-{dead.pid}_1-0.frozen")
        with open(marker, "w") as f:
            f.write(f'{{"mount_point": "{staging}"}}')
        d.start()
        assert "recovery: thawed " + staging in d.log()
        # A write completes only on a thawed filesystem.
        writer = subprocess.run(["sh", "-c", f'echo x > "{staging}/after"'], timeout=20, check=False)
        assert writer.returncode == 0
        assert not os.path.exists(marker)
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", staging], check=False, capture_output=True)
    d.unstage(vid, staging)
    d.delete(vid)
    assert d.stop() == 0
    assert leftovers(base) == []
