"""Run a real ``elv serve`` on the loop backend in a scratch directory, and
clean up every mount, loop device and process it leaves, even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc

from csi.host import scratch as scratch_dirs
from csi.v1 import csi_pb2, csi_pb2_grpc
from tests.support import observe
from tests.support.forked import ForkedDriver
from tests.support.paths import REPO
from tests.support.rpc import mount_cap

MiB = 1024 * 1024


def leftovers(base: str) -> list[str]:
    """Mounts and loop devices that belong to this scratch directory, read
    from /proc/self/mountinfo and /sys/block (never the driver's helpers)."""
    return observe.leftovers(base)


class Driver:
    """One ``elv serve`` process plus a CSI client for it."""

    def __init__(self, base: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.pool = os.path.join(base, "pool")
        self.kubelet = os.path.join(base, "kubelet")
        self.socket = os.path.join(base, "csi.sock")
        self.log_path = os.path.join(base, "driver.log")
        self.extra = list(extra)
        self.env = env
        self.proc: subprocess.Popen[bytes] | ForkedDriver | None = None
        # Restarts fork a pre-imported interpreter (tests/support/forked.py).
        self.fork = False
        self.channel: grpc.Channel | None = None
        os.makedirs(self.kubelet, exist_ok=True)

    @property
    def endpoint(self) -> str:
        return "unix://" + self.socket

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "csi", "serve", "--backend", "loop", "--loop-dir", self.pool]
        argv += ["--node-id", "node-a", "--endpoint", self.endpoint, "--kubelet-dir", self.kubelet]
        return [*argv, "--state-dir", os.path.join(self.base, "run"), *self.extra]

    def start(self, wait: bool = True) -> Driver:
        if self.fork:
            assert self.env is None, "a forked driver shares the forkserver's environment"
            argv = self.argv()
            assert argv[1:3] == ["-m", "csi"], argv
            self.proc = ForkedDriver(argv[3:], self.log_path)
        else:
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            env = dict(os.environ, PYTHONPATH=REPO, **(self.env or {}))
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=env, cwd=REPO)
            log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"driver exited with {self.proc.returncode}:\n{self.log()}")
            if self.listening():
                try:
                    self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    # A failed connect puts the channel into reconnect backoff (1 s);
                    # a fresh channel retries at once.
                    self.close_channel()
            time.sleep(0.02)
        raise TimeoutError(f"driver not ready after {timeout}s:\n{self.log()}")

    def listening(self) -> bool:
        """Whether something accepts connections on the socket. A plain
        connect is far cheaper than a gRPC channel, and the socket a killed
        driver left refuses connections until the next one replaces it: under
        emulation, polling with channels took CPU from the driver starting."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.socket)
            return True
        except OSError:
            return False
        finally:
            s.close()

    def _chan(self) -> grpc.Channel:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.endpoint)
        return self.channel

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self._chan())

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self._chan())

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self._chan())

    @property
    def group(self) -> csi_pb2_grpc.GroupControllerStub:
        return csi_pb2_grpc.GroupControllerStub(self._chan())

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.close_channel()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.wait()  # it has exited: this is its status
        self.proc = None
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Driver:
        self.stop()
        return self.start()

    # -- convenience wrappers ----------------------------------------------------

    def path(self, *parts: str) -> str:
        return os.path.join(self.kubelet, *parts)

    def create(self, name: str, size: int = 64 * MiB, cap: csi_pb2.VolumeCapability | None = None, **kw: object) -> str:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[cap or mount_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            **kw,  # type: ignore[arg-type]
        )
        return self.controller.CreateVolume(req).volume.volume_id

    def stage(self, vid: str, staging: str, cap: csi_pb2.VolumeCapability | None = None) -> None:
        os.makedirs(staging, exist_ok=True)
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap or mount_cap()
            )
        )

    def publish(
        self, vid: str, staging: str, target: str, cap: csi_pb2.VolumeCapability | None = None, readonly: bool = False
    ) -> None:
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=staging,
                target_path=target,
                volume_capability=cap or mount_cap(),
                readonly=readonly,
            )
        )

    def unpublish(self, vid: str, target: str) -> None:
        self.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))

    def unstage(self, vid: str, staging: str) -> None:
        self.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))

    def delete(self, vid: str) -> None:
        self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))


def stop_cleanly(d: Driver, base: str) -> None:
    """Stop a fixture's driver and check it: a clean exit, no traceback in its
    log, nothing left mounted or attached under ``base`` (each test must undo
    what it did through CSI; scratch() cleans up by force only after a failure)."""
    rc = d.stop()
    left = leftovers(base) + observe.processes_using(base)
    assert rc == 0, f"driver exited with {rc}:\n{d.log()[-3000:]}"
    assert "Traceback" not in d.log(), d.log()[-5000:]
    assert not left, f"test left behind: {left}"


@contextlib.contextmanager
def scratch() -> Iterator[str]:
    """A short-path scratch dir (unix socket paths are limited to 107 bytes)."""
    base = scratch_dirs.make("it")
    try:
        yield base
    finally:
        scratch_dirs.remove(base)
