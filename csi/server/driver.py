"""Build and run the gRPC server on its unix socket.

grpc.aio is used because handlers shell out: with a thread pool, a hung
``mount`` pins a worker and enough of them starve Probe; with asyncio only
the coroutine that waits is stuck (measured in the dependency notes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import stat
import sys
from typing import TYPE_CHECKING

import grpc

from csi.backend import build
from csi.backend.base import Backend
from csi.config import Config
from csi.errors import ElvError
from csi.host.fs import FsTool
from csi.host.paths import PathGuard
from csi.host.runner import Runner
from csi.node.ops import NodeOps
from csi.server.interceptor import RpcInterceptor
from csi.services.controller import ControllerService
from csi.services.gate import Gate
from csi.services.group import GroupControllerService
from csi.services.identity import IdentityService
from csi.services.node import NodeService
from csi.v1 import csi_pb2_grpc

if TYPE_CHECKING:
    from csi.kube.agent import KubeAgent
    from csi.server.metrics import Metrics

log = logging.getLogger(__name__)
MAX_UNIX_PATH = 107


class SocketError(ElvError):
    pass


def prepare_socket(path: str) -> None:
    """Make ``path`` free for a new socket.

    A stale socket from a dead driver is removed; a live one (something
    answers) or anything that is not a socket is refused and left untouched.
    """
    if len(path.encode()) > MAX_UNIX_PATH:
        raise SocketError(f"socket path {path} is longer than {MAX_UNIX_PATH} bytes")
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketError(f"cannot check {path}: {e.strerror}") from e
        os.unlink(path)  # nobody listens: a leftover from a crash
        log.info("removed stale socket %s", path)
        return
    finally:
        probe.close()
    raise SocketError(f"another process is already serving on {path}")


def secure_socket(path: str, group: str | None) -> None:
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


class Driver:
    """Everything one ``elv serve`` process runs."""

    def __init__(self, config: Config, *, runner: Runner | None = None, backend: Backend | None = None) -> None:
        self.config = config
        self.gate = Gate()
        self.metrics: Metrics | None = None
        if config.metrics_address:
            from csi.server.metrics import Metrics

            self.metrics = Metrics(in_flight=self.gate.in_flight)
        self.runner = runner or Runner(
            default_timeout=config.command_timeout,
            max_parallel=config.max_parallel_commands,
            search_path=config.tool_path,
            journal_dir=os.path.join(config.run_dir, "commands"),
            observer=self.metrics.observe_command if self.metrics else None,
        )
        self.backend = backend or build(config, self.runner)
        self.interceptor = RpcInterceptor(observer=self.metrics.observe_rpc if self.metrics else None)
        self._tasks: list[asyncio.Task[None]] = []
        self.server: grpc.aio.Server | None = None
        self._stop = asyncio.Event()
        self.kube: KubeAgent | None = None

    async def start(self) -> None:
        cfg = self.config
        # A previous instance killed mid-operation may have left a mutating command
        # (mkfs, losetup, cp) running; racing it would corrupt what it writes.
        orphans = await self.runner.wait_for_orphans(timeout=cfg.command_timeout)
        if orphans:
            log.warning("waited for %d command(s) left running by a previous instance", orphans)
        await self.backend.start()
        server = grpc.aio.server(
            interceptors=[self.interceptor],
            maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
            options=[("grpc.max_receive_message_length", 4 * 1024 * 1024)],
        )
        csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(cfg, self.backend, group_snapshots=True), server)
        if cfg.mode.controller:
            controller = ControllerService(cfg, self.backend, self.gate, peers=self._kube_agent())
            csi_pb2_grpc.add_ControllerServicer_to_server(controller, server)
            csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(self.backend, self.gate), server)
        if cfg.mode.node:
            ops = NodeOps(self.backend, PathGuard(cfg.kubelet_dir), FsTool(self.runner, xfs_config=cfg.xfs_config))
            csi_pb2_grpc.add_NodeServicer_to_server(NodeService(cfg, ops, self.gate), server)
        path = cfg.socket_path
        prepare_socket(path)
        old = os.umask(0o177)  # the socket is born 0600; no window where others may connect
        try:
            if server.add_insecure_port("unix://" + path) == 0:
                raise SocketError(f"cannot listen on {path}")
        finally:
            os.umask(old)
        secure_socket(path, cfg.socket_group)
        await server.start()
        self.server = server
        if self.kube is not None and cfg.mode.controller:
            self.kube.start(asyncio.get_running_loop(), controller.modify_here, self._owns)
        if self.metrics is not None and cfg.metrics_address:
            self.metrics.serve(cfg.metrics_address)
            self._tasks.append(asyncio.ensure_future(self.metrics.refresh_forever(self.backend.pool_stats)))
        log.info(
            "serving CSI",
            extra={
                "fields": {
                    "endpoint": cfg.endpoint,
                    "backend": cfg.backend,
                    "mode": cfg.mode.value,
                    "node": cfg.node_id,
                }
            },
        )

    def _kube_agent(self) -> KubeAgent | None:
        """The work done through the Kubernetes API (csi.kube), if asked for."""
        if not self.config.kubernetes_api:
            return None
        from csi.kube.agent import KubeAgent
        from csi.kube.client import Kube

        self.kube = KubeAgent(Kube(self.config.kubernetes_api), self.config.node_id, self.config.driver_name)
        return self.kube

    async def _owns(self, kind: str, object_id: str) -> bool:
        """Whether a volume, snapshot or group snapshot is on this node."""
        if kind == "volume":
            return await self.backend.get_volume(object_id) is not None
        if kind == "snapshot":
            return await self.backend.get_snapshot(object_id) is not None
        return await self.backend.get_group_snapshot(object_id) is not None

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self, grace: float = 10.0) -> None:
        if self.kube is not None:
            self.kube.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace)
        # Let shielded operations (a copy, an mkfs) finish rather than cut them off.
        for _ in range(int(grace * 10)):
            if self.gate.in_flight() == 0:
                break
            await asyncio.sleep(0.1)
        # Background work (the LVM wiper) stops next; then every command still
        # running is waited for or reaped, so none outlives the event loop.
        await self.backend.stop()
        killed = await self.runner.close(grace)
        if killed:
            log.warning("killed %d command(s) still running at shutdown", killed)
        path = self.config.socket_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        # Nothing left running: the journal is empty and the run dir can go.
        for d in (os.path.join(self.config.run_dir, "commands"), self.config.run_dir):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        log.info("stopped")


def _fast_child_watcher(loop: asyncio.AbstractEventLoop) -> None:
    """Python 3.11 waits for each child from a thread of its own; a pidfd watcher
    needs none (measured: 5.1 -> 2.6 ms per command). 3.12 does this itself."""
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (OSError, AttributeError):
        return
    watcher = asyncio.PidfdChildWatcher()
    asyncio.set_child_watcher(watcher)
    watcher.attach_loop(loop)


async def run(config: Config) -> int:
    loop = asyncio.get_running_loop()
    _fast_child_watcher(loop)
    # Blocking calls (mount(2), mountinfo, fsync) run in worker threads. A mount can
    # hang on a broken device; the default pool (cores + 4) would then starve
    # every other volume's RPCs, so give it room.
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="elv-io"))
    driver = Driver(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, driver.request_stop)
    try:
        await driver.start()
    except ElvError as e:
        log.error("cannot start: %s", e.message)
        return 1
    await driver.wait()
    await driver.stop()
    return 0
