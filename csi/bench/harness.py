"""Processes and clients for the benchmark: a driver under test (ELV or a peer
CSI driver) started in a scratch directory, and an async CSI client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

import grpc

from csi.host import scratch as scratch_dirs
from csi.v1 import csi_pb2, csi_pb2_grpc

MiB = 1024 * 1024


class Target:
    """A CSI driver process under test, with its own scratch directory."""

    def __init__(self, name: str, base: str, argv: list[str], socket_path: str, kubelet: str, pool: str) -> None:
        self.name = name
        self.base = base
        self.argv = argv
        self.socket = socket_path
        self.kubelet = kubelet
        self.pool = pool
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self.log_path = os.path.join(base, f"{name}.log")
        #: Called with the RPC's name after each timed RPC (csi.bench.lvm traces commands with it).
        self.on_rpc: Callable[[str], None] | None = None

    @classmethod
    def elv(cls, base: str, *extra: str) -> Target:
        """ELV on the loop backend, its pool in ``base``."""
        pool = os.path.join(base, "pool")
        return cls._elv(base, pool, ["--loop-dir", pool, *extra])

    @classmethod
    def elv_lvm(cls, base: str, lvm_config: str, log_level: str = "warning") -> Target:
        """ELV on the lvm backend, with the device classes of ``lvm_config``."""
        return cls._elv(base, "", ["--backend", "lvm", "--lvm-config", lvm_config], log_level)

    @classmethod
    def _elv(cls, base: str, pool: str, backend: list[str], log_level: str = "warning") -> Target:
        sock, kubelet = os.path.join(base, "elv.sock"), os.path.join(base, "kubelet")
        argv = [sys.executable, "-m", "csi", "serve", *backend, "--kubelet-dir", kubelet, "--node-id", "bench"]
        argv += ["--endpoint", "unix://" + sock, "--state-dir", os.path.join(base, "run"), "--log-level", log_level]
        argv += ["--max-concurrent-rpcs", "1024"]
        return cls("elv", base, argv, sock, kubelet, pool)

    @classmethod
    def hostpath(cls, base: str, binary: str) -> Target:
        sock, kubelet, state = (os.path.join(base, x) for x in ("hp.sock", "kubelet", "hpstate"))
        argv = [binary, "--endpoint", "unix://" + sock, "--nodeid", "bench", "--drivername", "hostpath.csi.k8s.io"]
        argv += ["--statedir", state, "--v", "0"]
        return cls("hostpath", base, argv, sock, kubelet, state)

    async def start(self) -> float:
        """Start the process; return seconds until the first Probe answered."""
        os.makedirs(self.kubelet, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(*self.argv, stdout=log, stderr=log)
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if os.path.exists(self.socket):
                try:
                    await self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
                    return time.monotonic() - t0
                except grpc.aio.AioRpcError:
                    await self.close_channel()
            await asyncio.sleep(0.005)

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        await self.close_channel()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _chan(self) -> grpc.aio.Channel:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(
                "unix://" + self.socket, options=[("grpc.max_receive_message_length", 256 * MiB)]
            )
        return self.channel

    @property
    def identity(self) -> csi_pb2_grpc.IdentityAsyncStub:
        return csi_pb2_grpc.IdentityStub(self._chan())

    @property
    def controller(self) -> csi_pb2_grpc.ControllerAsyncStub:
        return csi_pb2_grpc.ControllerStub(self._chan())

    @property
    def node(self) -> csi_pb2_grpc.NodeAsyncStub:
        return csi_pb2_grpc.NodeStub(self._chan())


@contextlib.contextmanager
def scratch(kind: str = "bench") -> Iterator[str]:
    base = scratch_dirs.make(kind)
    try:
        yield base
    finally:
        scratch_dirs.remove(base)


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


async def run_section(res: dict[str, Any], name: str, want: Collection[str], run: Callable[[], Awaitable[Any]]) -> None:
    """Run one section into ``res[name]``. One that is not wanted or fails is
    recorded as such (its targets become UNMEASURED, with the reason), and the
    run goes on with the next."""
    if name not in want:
        res[name] = {"unmeasured": f"the {name} section was not selected (--sections)"}
        return
    try:
        res[name] = await run()
    except grpc.aio.AioRpcError as e:
        res[name] = {"error": f"{e.code().name}: {e.details()}"}
    except Exception as e:  # reported in the results and the verdicts; the next section still runs
        res[name] = {"error": f"{type(e).__name__}: {e}"}
