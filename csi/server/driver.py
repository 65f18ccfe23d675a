"""Build and run the gRPC server on its unix socket.

grpc.aio is used because handlers shell out: with a thread pool, a hung
``mount`` pins a worker and enough of them starve Probe; with asyncio only
the coroutine that waits is stuck (measured in the dependency notes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import faulthandler
import grp
import logging
import os
import signal
import stat
import sys
import threading
from typing import TYPE_CHECKING

import grpc

from csi.backend import build
from csi.backend.base import Backend
from csi.config import Config
from csi.errors import ElvError
from csi.host.fs import FsTool
from csi.host.loop import LoopTool
from csi.host.paths import PathGuard
from csi.host.runner import Runner
from csi.host.sockets import SocketError, prepare_socket
from csi.node.ops import NodeOps
from csi.node.views import Views
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
#: Seconds stop() gives RPCs, operations and commands before it kills what runs.
STOP_GRACE = 10.0
#: Seconds a command still gets when the deadline has passed.
COMMAND_GRACE = 2.0
#: Seconds beyond STOP_GRACE before the watchdog ends the process (reaping
#: killed commands takes up to 7 s); well within the 30 s Kubernetes allows.
WATCHDOG_SLACK = 12.0
#: The exit status when the watchdog had to end the process.
EXIT_WATCHDOG = 3


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
            ops = NodeOps(
                self.backend,
                PathGuard(cfg.kubelet_dir),
                FsTool(self.runner, xfs_config=cfg.xfs_config),
                Views(LoopTool(self.runner, direct_io=False)),
            )
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

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop within about ``grace`` seconds: one deadline for all that may
        still finish (RPCs in flight, the shielded operations they started,
        commands still running), then what still runs is killed and reaped.

        Each phase used to get its own ``grace``: up to 37 s in all, past the
        30 s after which Kubernetes (and the test harness) kill the process."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("stopping", extra={"fields": {"in_flight": self.gate.in_flight(), "commands": self.runner.running}})

        def left() -> float:
            return max(0.0, deadline - loop.time())

        if self.kube is not None:
            self.kube.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop(left())
        # Let shielded operations (a copy, an mkfs) finish rather than cut them off.
        for _ in range(int(left() * 10)):
            if self.gate.in_flight() == 0:
                break
            await asyncio.sleep(0.1)
        # Background work (the LVM wiper) stops next; then every command still
        # running is waited for or reaped, so none outlives the event loop. A
        # command gets a moment even when the deadline has passed (an lvm
        # killed mid-change may leave a device suspended).
        await self.backend.stop()
        killed = await self.runner.close(max(left(), COMMAND_GRACE))
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


def _arm_exit_watchdog(seconds: float) -> threading.Timer:
    """After SIGTERM the process ends within ``seconds``, whatever hangs.

    stop() is bounded, but the interpreter's own exit is not: it joins every
    worker thread, and a thread blocked in the kernel (a mount on a dead
    device, an uninterruptible ioctl) would keep the process alive until the
    kubelet's SIGKILL, with nothing in the log to say why. The watchdog logs
    every thread's stack and exits; what was cut off is recovered at the next
    start, as after any crash."""

    def fire() -> None:
        log.error("still running %.0fs after SIGTERM; the stacks follow, then exiting", seconds)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(all_threads=True)
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        os._exit(EXIT_WATCHDOG)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.name = "elv-exit-watchdog"
    timer.start()
    return timer


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
        # Startup may have run commands or started the resident lvm shell:
        # end them while the loop that owns their pipes still runs.
        await driver.runner.close(0)
        return 1
    await driver.wait()
    _arm_exit_watchdog(STOP_GRACE + WATCHDOG_SLACK)
    await driver.stop()
    return 0
