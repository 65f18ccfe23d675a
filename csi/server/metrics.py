"""Prometheus metrics (``elv serve --metrics-address HOST:PORT``).

The CSI sidecars already export per-RPC metrics as *they* see them; the
driver adds what only it can see: its own RPC handling, every external
command, the pool's capacity and use, thin-pool fill, volume counts and
operations in flight. prometheus-client is imported only when metrics are
enabled, so a driver without them starts faster and needs no extra package.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from csi.model import PoolStats

log = logging.getLogger(__name__)

#: Latency buckets from 1 ms (a bind mount) to 10 min (a large copy).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class Snapshot:
    pools: list[PoolStats] = field(default_factory=list)


class Metrics:
    def __init__(self, in_flight: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.rpc_total = Counter("elv_rpc_total", "CSI RPCs served", ["method", "code"], registry=self.registry)
        self.rpc_seconds = Histogram(
            "elv_rpc_duration_seconds", "CSI RPC handling time", ["method"], buckets=BUCKETS, registry=self.registry
        )
        self.cmd_seconds = Histogram(
            "elv_command_duration_seconds",
            "External command run time",
            ["command"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.cmd_failures = Counter(
            "elv_command_failures_total",
            "External commands that failed or timed out",
            ["command", "reason"],
            registry=self.registry,
        )
        self._in_flight = in_flight
        self._sample = Snapshot()
        self.registry.register(_PoolCollector(self))

    # Observers wired into the interceptor and the runner.
    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_total.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def observe_command(self, program: str, seconds: float, rc: int | None) -> None:
        self.cmd_seconds.labels(program).observe(seconds)
        if rc is None:
            self.cmd_failures.labels(program, "timeout").inc()
        elif rc != 0:
            self.cmd_failures.labels(program, "exit").inc()

    def set_pools(self, pools: list[PoolStats]) -> None:
        self._sample = Snapshot(pools)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        data: bytes = generate_latest(self.registry)
        return data

    def serve(self, address: str) -> threading.Thread:
        """Serve /metrics on HOST:PORT in a daemon thread."""
        from prometheus_client import start_http_server

        host, _, port = address.rpartition(":")
        _server, thread = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
        log.info("serving metrics", extra={"fields": {"address": address}})
        return thread

    async def refresh_forever(self, sample: Callable[[], Any], every: float = 10.0) -> None:
        """Refresh pool gauges from the backend every ``every`` seconds."""
        while True:
            try:
                self.set_pools(await sample())
            except Exception:
                log.warning("refreshing pool metrics failed", exc_info=True)
            await asyncio.sleep(every)


class _PoolCollector:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        fams = {
            "size": GaugeMetricFamily("elv_pool_size_bytes", "Bytes the pool can hold", labels=["pool"]),
            "used": GaugeMetricFamily("elv_pool_used_bytes", "Bytes allocated in the pool", labels=["pool"]),
            "avail": GaugeMetricFamily(
                "elv_pool_available_bytes", "Bytes GetCapacity can still promise", labels=["pool"]
            ),
            "vols": GaugeMetricFamily("elv_volumes", "Volumes in the pool", labels=["pool"]),
            "snaps": GaugeMetricFamily("elv_snapshots", "Snapshots in the pool", labels=["pool"]),
            "tdata": GaugeMetricFamily("elv_thin_pool_data_percent", "Thin pool data use", labels=["pool"]),
            "tmeta": GaugeMetricFamily("elv_thin_pool_metadata_percent", "Thin pool metadata use", labels=["pool"]),
        }
        for p in self._m._sample.pools:
            fams["size"].add_metric([p.pool], p.size_bytes)
            fams["used"].add_metric([p.pool], p.used_bytes)
            fams["avail"].add_metric([p.pool], p.available_bytes)
            fams["vols"].add_metric([p.pool], p.volumes)
            fams["snaps"].add_metric([p.pool], p.snapshots)
            if p.thin_data_percent is not None:
                fams["tdata"].add_metric([p.pool], p.thin_data_percent)
            if p.thin_metadata_percent is not None:
                fams["tmeta"].add_metric([p.pool], p.thin_metadata_percent)
        inflight = GaugeMetricFamily("elv_operations_in_flight", "Mutating operations running now")
        inflight.add_metric([], self._m._in_flight())
        return [*fams.values(), inflight]
