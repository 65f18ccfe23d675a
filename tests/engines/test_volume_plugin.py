"""``elv docker-plugin`` under real Docker and Podman.

Each engine gets its own driver, plugin and private engine state (module
scope: the tests of one engine run in order, sharing them). Volumes are
checked through the engine (what a developer sees) and with our own eyes:
the driver's ListVolumes, the pool's files, /proc/self/mountinfo and
/sys/block. The last test stops everything and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from csi.host import loop as loopdev
from csi.host.mountinfo import MountTable
from csi.v1 import csi_pb2
from tests.support.driver import Driver
from tests.support.engines import (
    MARKER,
    Docker,
    Engine,
    PluginProcess,
    Podman,
    Record,
    engine_scratch,
    leftovers,
)
from tests.support.paths import REPO

MiB = 1024 * 1024


@dataclass
class Stack:
    base: str
    record: Record
    driver: Driver
    plugin: PluginProcess
    engine: Engine
    others: list[Engine] = field(default_factory=list)

    def elv(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "csi", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": REPO, "CSI_ENDPOINT": self.driver.endpoint},
            check=False,
        )
        if check:
            assert r.returncode == 0, f"elv {' '.join(args)}: {r.stdout}{r.stderr}"
        return r

    def volume(self, name: str) -> csi_pb2.Volume | None:
        """The driver's record of a volume (by name), or None."""
        for e in self.driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries:
            if e.volume.volume_context.get("elv.csi.dev/name") == name:
                return e.volume
        return None

    def plugin_mounts(self) -> list[str]:
        root = os.path.realpath(self.driver.path("plugins"))
        return [m.mount_point for m in MountTable.load().under(root)]

    def loops(self) -> list[str]:
        pool = os.path.realpath(self.driver.pool) + "/"
        return [d.name for d in loopdev.scan() if d.backing_file.startswith(pool)]

    def close(self) -> list[str]:
        for e in [*self.others, self.engine]:
            e.close()
        self.plugin.stop()
        rc = self.driver.stop()
        assert rc == 0, self.driver.log()[-3000:]
        self.record.undo()
        return leftovers(self.record)


@pytest.fixture(scope="module", params=["docker", "podman"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with engine_scratch() as (base, record):
        driver = Driver(base, env={MARKER: base})
        plugin = PluginProcess(record, driver.endpoint)
        if request.param == "docker":
            engine: Engine = Docker(base, record, plugin.name)
        else:
            engine = Podman(base, record, plugin.name, plugin.socket)
        st = Stack(base, record, driver, plugin, engine)
        try:
            driver.start()
            plugin.start()
            engine.start()
            yield st
        finally:
            for e in [*st.others, st.engine]:
                e.close()
            plugin.stop()
            driver.stop()


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _inspect(stack: Stack, name: str) -> dict[str, object]:
    out = json.loads(stack.engine.cli("volume", "inspect", name).stdout)
    assert isinstance(out, list) and len(out) == 1
    return out[0]  # type: ignore[no-any-return]


def _df_bytes(stack: Stack, container: str, path: str = "/data") -> int:
    lines = stack.engine.exec(container, f"df -k {path}").stdout.strip().splitlines()
    return int(lines[-1].split()[1]) * 1024


def _remove_volume(stack: Stack, name: str) -> None:
    stack.engine.cli("volume", "rm", name)
    assert stack.volume(name) is None, f"{name} is still in the driver after volume rm"


# -- the tests -----------------------------------------------------------------------------------


def test_create_with_options(stack: Stack) -> None:
    name = _name("opts")
    r = stack.engine.create(name, size="320Mi", fs="xfs", provisioning="thick")
    assert r.returncode == 0, r.stderr
    vol = stack.volume(name)
    assert vol is not None
    assert vol.capacity_bytes == 320 * MiB
    assert vol.volume_context["elv.csi.dev/fs"] == "xfs"
    assert vol.volume_context["elv.csi.dev/created-by"] == "docker-plugin"
    image = os.path.join(stack.driver.pool, "volumes", vol.volume_id + ".img")
    assert os.stat(image).st_blocks * 512 >= 320 * MiB, "thick: every block allocated at create"
    status = _inspect(stack, name)["Status"]
    assert isinstance(status, dict)
    assert status["VolumeID"] == vol.volume_id
    assert (status["Size"], status["SizeBytes"], status["Filesystem"]) == ("320 MiB", 320 * MiB, "xfs")
    assert status["Used"] == "unknown while not mounted"
    listed = stack.engine.cli("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.split("\n")
    assert f"{stack.plugin.name} {name}" in listed
    _remove_volume(stack, name)
    assert not os.path.exists(image)


def test_a_container_writes_and_another_reads(stack: Stack) -> None:
    name, payload = _name("rw"), secrets.token_hex(8)
    assert stack.engine.create(name, size="64Mi").returncode == 0
    stack.engine.run(name, f"echo {payload} > /data/payload && sync")
    assert stack.plugin_mounts() == [], "unmounted when the writer exited"
    assert stack.engine.run(name, "cat /data/payload").strip() == payload
    assert stack.plugin_mounts() == [] and stack.loops() == []
    _remove_volume(stack, name)


def test_two_containers_share_a_volume_until_the_last_unmount(stack: Stack) -> None:
    name = _name("shared")
    assert stack.engine.create(name, size="64Mi").returncode == 0
    stack.engine.start_container(f"{name}-1", name)
    stack.engine.start_container(f"{name}-2", name)
    try:
        info = _inspect(stack, name)
        if stack.engine.kind == "docker":
            # Docker mounts once per container, each with a new ID: the plugin counts both.
            assert info["Status"]["Mounts"] == 2  # type: ignore[index]
        else:
            # Podman counts its containers itself and mounts through the plugin once.
            assert (info["Status"]["Mounts"], info["MountCount"]) == (1, 2)  # type: ignore[index]
        mounted = stack.plugin_mounts()
        assert len(mounted) == 2 and {os.path.basename(m) for m in mounted} == {"staging", "mnt"}
        stack.engine.remove_container(f"{name}-1")
        assert stack.plugin_mounts() == mounted, "the other container still uses it"
        assert stack.engine.exec(f"{name}-2", "echo still > /data/f && cat /data/f").stdout.strip() == "still"
        assert _inspect(stack, name)["Status"]["Mounts"] == 1  # type: ignore[index]
    finally:
        stack.engine.remove_container(f"{name}-2")
    assert stack.plugin_mounts() == [] and stack.loops() == [], "the last unmount unstages"
    _remove_volume(stack, name)


def test_expand_while_a_container_runs_and_df_sees_it(stack: Stack) -> None:
    name, c = _name("grow"), _name("grow-c")
    # xfs: this host's root lacks CAP_SYS_RESOURCE, which online ext4 growth needs.
    assert stack.engine.create(name, size="320Mi", fs="xfs").returncode == 0
    stack.engine.start_container(c, name)
    try:
        before = _df_bytes(stack, c)
        r = stack.elv("volume", "expand", name, "--size", "640Mi")
        assert "(grown online)" in r.stdout
        after = _df_bytes(stack, c)
        # The filesystem grew by (nearly) the 320 MiB added; xfs keeps its log.
        assert before < 320 * MiB < after <= 640 * MiB, (before, after)
        assert after - before >= 300 * MiB, (before, after)
        vol = stack.volume(name)
        assert vol is not None and vol.capacity_bytes == 640 * MiB
    finally:
        stack.engine.remove_container(c)
    _remove_volume(stack, name)


def test_snapshot_then_a_volume_from_it_holds_the_data(stack: Stack) -> None:
    name, snap, payload = _name("src"), _name("snap"), secrets.token_hex(8)
    assert stack.engine.create(name, size="64Mi").returncode == 0
    stack.engine.run(name, f"echo {payload} > /data/payload && sync")
    stack.elv("volume", "snapshot", name, snap)
    stack.engine.run(name, "echo changed > /data/payload")
    restored, clone = _name("restored"), _name("clone")
    r = stack.engine.create(restored, from_=snap)
    assert r.returncode == 0, r.stderr
    assert stack.engine.run(restored, "cat /data/payload").strip() == payload
    r = stack.engine.create(clone, from_=name, size="128Mi")
    assert r.returncode == 0, r.stderr
    assert stack.engine.run(clone, "cat /data/payload").strip() == "changed"
    src = stack.volume(name)
    copies = [stack.volume(restored), stack.volume(clone)]
    assert src is not None and all(v is not None for v in copies)
    assert copies[0].content_source.snapshot.snapshot_id.startswith("s-")  # type: ignore[union-attr]
    assert copies[1].content_source.volume.volume_id == src.volume_id  # type: ignore[union-attr]
    assert copies[1].capacity_bytes == 128 * MiB  # type: ignore[union-attr]
    for v in (restored, clone, name):
        _remove_volume(stack, v)
    stack.elv("volume", "snapshot", name, snap, "--delete", check=False)


def test_remove_of_a_volume_in_use_is_refused(stack: Stack) -> None:
    name, c = _name("busy"), _name("busy-c")
    assert stack.engine.create(name, size="64Mi").returncode == 0
    stack.engine.start_container(c, name)
    try:
        # The engine knows its own container uses it, and refuses first.
        r = stack.engine.cli("volume", "rm", name, check=False)
        assert r.returncode != 0
        assert ("volume is in use" if stack.engine.kind == "docker" else "volume is being used") in r.stderr
        # Another engine instance (its own state, the same plugin) knows no
        # container: the plugin itself refuses, and the engine prints its message.
        other = stack.engine.second()
        stack.others.append(other)
        assert other.create(name).returncode == 0, "an existing volume, asked for without options"
        r = other.cli("volume", "rm", name, check=False)
        assert r.returncode != 0
        msg = f"volume {name} is in use (1 container mount); stop the containers that use it first"
        assert msg in r.stderr, r.stderr
        assert stack.volume(name) is not None
        assert stack.engine.exec(c, "echo alive > /data/f && cat /data/f").stdout.strip() == "alive"
    finally:
        stack.engine.remove_container(c)
    _remove_volume(stack, name)


BAD = [
    (
        {"colour": "blue"},
        "unknown option 'colour'; the elv volume driver takes: size (e.g. 1G, 512Mi or a number of bytes), "
        "fs (ext4 or xfs), provisioning (thin or thick), from (a snapshot or a volume to copy)",
    ),
    ({"size": "lots"}, "size='lots': not a size; use e.g. 1G, 512Mi or a number of bytes"),
    ({"size": "0"}, "size='0': must be more than 0 and at most 1 PiB"),
    ({"fs": "btrfs"}, "fs='btrfs': use ext4 or xfs"),
    ({"provisioning": "fat"}, "provisioning='fat': use thin or thick"),
    (
        {"from_": "no-such-thing"},
        "from=no-such-thing: no snapshot or volume has that name or ID "
        "(see `elv volume list` and `elv volume show VOLUME`)",
    ),
]


def _printed(engine: Engine, name: str, msg: str) -> str:
    """How the engine prints a plugin's refusal of Create."""
    if engine.kind == "docker":
        return f"Error response from daemon: create {name}: VolumeDriver.Create: {msg}"
    p = engine.plugin
    return f'Error: creating volume "{name}" in plugin {p}: on /VolumeDriver.Create on volume {name} in volume plugin {p}: {msg}'


def test_bad_options_are_refused_with_a_clear_message(stack: Stack) -> None:
    for opts, msg in BAD:
        name = _name("bad")
        r = stack.engine.create(name, **opts)
        assert r.returncode != 0
        assert r.stderr.strip().splitlines()[-1] == _printed(stack.engine, name, msg), (opts, r.stderr)
        assert stack.volume(name) is None
    # The driver's own refusal reaches the user the same way.
    name = _name("huge")
    r = stack.engine.create(name, size="900T")
    assert r.returncode != 0 and "(RESOURCE_EXHAUSTED)" in r.stderr, r.stderr
    # A name an ELV volume of another origin has is not taken over.
    taken = _name("taken")
    stack.elv("volume", "create", taken, "--size", "64Mi")
    r = stack.engine.create(taken, size="64Mi")
    msg = (
        f"an ELV volume named {taken} exists but was not created through the volume plugin "
        "(a Kubernetes volume, or one made with `elv volume create`); choose another name"
    )
    assert r.stderr.strip().splitlines()[-1] == _printed(stack.engine, taken, msg), r.stderr
    stack.elv("volume", "delete", taken)


def test_a_plugin_restart_mid_use_is_harmless(stack: Stack) -> None:
    name, c = _name("restart"), _name("restart-c")
    assert stack.engine.create(name, size="64Mi").returncode == 0
    stack.engine.start_container(c, name)
    try:
        stack.engine.exec(c, "echo before > /data/f")
        mounted = stack.plugin_mounts()
        assert stack.plugin.stop(signal.SIGKILL) == -signal.SIGKILL
        assert stack.plugin_mounts() == mounted, "a dead plugin unmounts nothing"
        stack.engine.exec(c, "echo during >> /data/f")
        stack.plugin.start()
        assert "is mounted for 1 container mount(s); kept" in stack.plugin.output()
        assert stack.plugin_mounts() == mounted
        assert stack.engine.exec(c, "echo after >> /data/f && cat /data/f").stdout.split() == [
            "before",
            "during",
            "after",
        ]
        assert _inspect(stack, name)["Status"]["Mounts"] == 1  # type: ignore[index]
    finally:
        stack.engine.remove_container(c)
    # The restarted plugin took over the reference: the container's exit unmounts.
    assert stack.plugin_mounts() == [] and stack.loops() == []
    _remove_volume(stack, name)


def test_everything_is_removed_and_nothing_is_left(stack: Stack) -> None:
    assert stack.engine.cli("volume", "ls", "-q").stdout.split() == []
    assert list(stack.driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries) == []
    assert stack.plugin_mounts() == []
    left = stack.close()
    assert left == [], left
    pool = os.path.join(stack.driver.pool, "volumes")
    assert os.listdir(pool) == []
    assert not os.path.exists(stack.plugin.socket)
    assert stack.loops() == []
