"""``elv docker-plugin`` spoken to directly over its socket (no engine), in
front of a real driver: which volumes it serves, reference counting per mount
ID, refusals, and what a restart keeps and what it undoes. The engines
themselves are in tests/engines."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from csi.host import loop as loopdev
from csi.host.mountinfo import MountTable
from csi.v1 import csi_pb2
from tests.support.driver import Driver
from tests.support.paths import REPO

MiB = 1024 * 1024


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("plugin", timeout=120)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        try:
            s.connect(self.path)
        except OSError:
            s.close()
            raise
        self.sock = s


class Plugin:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.socket = os.path.join(driver.base, "plugin", "elvit.sock")
        self.log = os.path.join(driver.base, "plugin.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Plugin:
        argv = [
            sys.executable,
            "-m",
            "csi",
            "docker-plugin",
            "--endpoint",
            self.driver.endpoint,
            "--socket",
            self.socket,
        ]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=f, env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO)
        for _ in range(1500):
            assert self.proc.poll() is None, self.output()
            if os.path.exists(self.socket):
                try:
                    self.call("/Plugin.Activate")
                    return self
                except OSError:
                    pass
            subprocess.run(["sleep", "0.02"], check=True)
        raise AssertionError(self.output())

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self.proc = None
        return rc

    def output(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def call(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        c = UnixHTTPConnection(self.socket)
        try:
            c.request("POST", path, body=json.dumps(body or {}), headers={"Content-Type": "application/json"})
            r = c.getresponse()
            assert r.getheader("Content-Type") == "application/vnd.docker.plugins.v1.1+json"
            return r.status, json.loads(r.read())
        finally:
            c.close()

    def ok(self, path: str, **body: Any) -> dict[str, Any]:
        status, out = self.call(path, body)
        assert status == 200 and "Err" not in out, out
        return out

    def err(self, path: str, **body: Any) -> str:
        status, out = self.call(path, body)
        assert status == 500, out
        return str(out["Err"])


@pytest.fixture
def plugin(driver: Driver) -> Iterator[Plugin]:
    p = Plugin(driver).start()
    try:
        yield p
    finally:
        p.stop()
        assert "Traceback" not in p.output(), p.output()


def _vid(driver: Driver, name: str) -> str | None:
    for e in driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries:
        if e.volume.volume_context.get("elv.csi.dev/name") == name:
            return e.volume.volume_id
    return None


def _mounted(driver: Driver) -> list[str]:
    return [m.mount_point for m in MountTable.load().under(os.path.realpath(driver.path("plugins")))]


def _loops(driver: Driver) -> list[str]:
    return [d.name for d in loopdev.scan() if d.backing_file.startswith(os.path.realpath(driver.pool) + "/")]


def test_handshake_and_the_volumes_it_serves(driver: Driver, plugin: Plugin) -> None:
    assert plugin.ok("/Plugin.Activate") == {"Implements": ["VolumeDriver"]}
    assert plugin.ok("/VolumeDriver.Capabilities") == {"Capabilities": {"Scope": "local"}}
    assert plugin.call("/VolumeDriver.Nope")[0] == 404
    plugin.ok("/VolumeDriver.Create", Name="mine", Opts={"size": "96Mi", "fs": "ext4"})
    other = driver.create("theirs", 64 * MiB)  # as Kubernetes or `elv volume create` would
    assert plugin.ok("/VolumeDriver.List") == {"Volumes": [{"Name": "mine", "Mountpoint": ""}]}
    got = plugin.ok("/VolumeDriver.Get", Name="mine")["Volume"]
    assert got["Name"] == "mine" and got["Mountpoint"] == ""
    assert got["Status"]["VolumeID"] == _vid(driver, "mine") and got["Status"]["SizeBytes"] == 96 * MiB
    assert plugin.err("/VolumeDriver.Get", Name="theirs") == "no such volume: theirs"
    assert plugin.err("/VolumeDriver.Mount", Name="theirs", ID="x") == "no such volume: theirs"
    assert "not created through the volume plugin; refusing to remove it" in plugin.err(
        "/VolumeDriver.Remove", Name="theirs"
    )
    assert "exists but was not created through the volume plugin" in plugin.err(
        "/VolumeDriver.Create", Name="theirs", Opts={}
    )
    assert _vid(driver, "theirs") == other
    # A repeat without options is the same volume; with other options the driver judges.
    plugin.ok("/VolumeDriver.Create", Name="mine")
    assert "(ALREADY_EXISTS)" in plugin.err("/VolumeDriver.Create", Name="mine", Opts={"size": "1Gi"})
    assert "invalid volume name" in plugin.err("/VolumeDriver.Create", Name="../x")
    plugin.ok("/VolumeDriver.Remove", Name="mine")
    plugin.ok("/VolumeDriver.Remove", Name="mine")  # gone already: fine
    assert _vid(driver, "mine") is None
    driver.delete(other)


def test_references_per_mount_id_and_only_the_last_unmount_unstages(driver: Driver, plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", Name="v", Opts={"size": "64Mi"})
    a = plugin.ok("/VolumeDriver.Mount", Name="v", ID="a" * 64)["Mountpoint"]
    b = plugin.ok("/VolumeDriver.Mount", Name="v", ID="b" * 64)["Mountpoint"]
    assert a == b and os.path.ismount(a)
    assert plugin.ok("/VolumeDriver.Path", Name="v") == {"Mountpoint": a}
    with open(os.path.join(a, "f"), "w") as f:
        f.write("data")
    status = plugin.ok("/VolumeDriver.Get", Name="v")["Volume"]["Status"]
    assert status["Mounts"] == 2 and status["UsedBytes"] > 0
    assert plugin.err("/VolumeDriver.Remove", Name="v") == (
        "volume v is in use (2 container mounts); stop the containers that use it first"
    )
    assert "mount ID" in plugin.err("/VolumeDriver.Mount", Name="v", ID="")
    plugin.ok("/VolumeDriver.Unmount", Name="v", ID="c" * 64)  # not a reference it holds: nothing happens
    plugin.ok("/VolumeDriver.Unmount", Name="v", ID="a" * 64)
    assert os.path.ismount(a) and len(_mounted(driver)) == 2
    plugin.ok("/VolumeDriver.Unmount", Name="v", ID="a" * 64)  # a repeat: still held by b
    assert os.path.ismount(a)
    plugin.ok("/VolumeDriver.Unmount", Name="v", ID="b" * 64)
    assert _mounted(driver) == [] and _loops(driver) == []
    assert plugin.ok("/VolumeDriver.Path", Name="v") == {"Mountpoint": ""}
    plugin.ok("/VolumeDriver.Remove", Name="v")
    assert _vid(driver, "v") is None


def test_a_restart_keeps_what_containers_hold_and_undoes_its_own_leftovers(driver: Driver, plugin: Plugin) -> None:
    for name in ("held", "orphan", "stale"):
        plugin.ok("/VolumeDriver.Create", Name=name, Opts={"size": "64Mi"})
    held = plugin.ok("/VolumeDriver.Mount", Name="held", ID="h")["Mountpoint"]
    orphan = plugin.ok("/VolumeDriver.Mount", Name="orphan", ID="o")["Mountpoint"]
    stale = plugin.ok("/VolumeDriver.Mount", Name="stale", ID="s")["Mountpoint"]
    with open(os.path.join(held, "f"), "w") as f:
        f.write("kept")
    assert plugin.stop(signal.SIGKILL) == -signal.SIGKILL
    # A crash between the mount and its reference: mounted, but no engine was told.
    refs = os.path.join(os.path.dirname(orphan), "refs")
    for r in os.listdir(refs):
        os.unlink(os.path.join(refs, r))
    # Mounted once, then unmounted behind the plugin's back (as a reboot would): its reference is stale.
    vid = _vid(driver, "stale")
    assert vid is not None
    driver.unpublish(vid, stale)
    driver.unstage(vid, os.path.join(os.path.dirname(stale), "staging"))
    plugin.start()
    assert os.path.ismount(held), "a container still holds it"
    with open(os.path.join(held, "f")) as f:
        assert f.read() == "kept"
    assert not os.path.ismount(orphan) and not os.path.exists(orphan), "its own leftover is undone"
    # The stale reference does not pin the volume: one mount and one unmount leave it unmounted.
    assert plugin.ok("/VolumeDriver.Mount", Name="stale", ID="s2")["Mountpoint"] == stale
    plugin.ok("/VolumeDriver.Unmount", Name="stale", ID="s2")
    assert not os.path.ismount(stale)
    # The restarted plugin took over the held reference.
    plugin.ok("/VolumeDriver.Unmount", Name="held", ID="h")
    assert _mounted(driver) == [] and _loops(driver) == []
    for name in ("held", "orphan", "stale"):
        plugin.ok("/VolumeDriver.Remove", Name=name)
    assert list(driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries) == []
    # A plugin stopped with SIGTERM removes its socket and leaves volumes as they are.
    assert plugin.stop() == 0
    assert not os.path.exists(plugin.socket)
    plugin.start()
