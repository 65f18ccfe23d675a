"""The ``elv`` command line. Configuration is read here, once, and nowhere else."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Sequence

from csi import DRIVER_NAME, __version__
from csi.config import Config, Mode
from csi.errors import ConfigError


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="serve CSI on a unix socket")
    p.add_argument(
        "--endpoint",
        default=_env("CSI_ENDPOINT", "unix:///run/elv/csi.sock"),
        help="unix:///absolute/path of the socket (env CSI_ENDPOINT)",
    )
    p.add_argument(
        "--node-id",
        default=_env("NODE_ID", socket.gethostname()),
        help="this node's ID, usually the Kubernetes node name (env NODE_ID)",
    )
    p.add_argument("--backend", choices=["loop", "lvm"], default="loop", help="storage backend")
    p.add_argument("--mode", choices=[m.value for m in Mode], default="all", help="which CSI services to serve")
    p.add_argument("--driver-name", default=DRIVER_NAME, help="CSI driver name")
    p.add_argument("--loop-dir", default="/var/lib/elv/loop", help="directory of the loop backend's pool")
    p.add_argument(
        "--kubelet-dir", default="/var/lib/kubelet", help="staging and target paths must lie beneath this directory"
    )
    lvm = p.add_argument_group("lvm backend")
    lvm.add_argument("--lvm-config", default=None, help="device-class file (see the README's LVM section)")
    lvm.add_argument("--lvm-vg", default=None, help="volume group of the single default device class")
    lvm.add_argument("--lvm-thin-pool", default=None, help="thin pool (in --lvm-vg) of the default device class")
    lvm.add_argument("--lvm-devices", default=None, help="device selector to build or extend the VG from empty disks")
    p.add_argument(
        "--overprovision-ratio",
        type=float,
        default=1.0,
        help="sparse volumes may promise this many times the pool's space (default 1.0: never)",
    )
    p.add_argument(
        "--node-expansion-only",
        action="store_true",
        help="grow volumes in NodeExpandVolume only (the per-node DaemonSet sets this)",
    )
    p.add_argument("--max-volumes-per-node", type=int, default=0, help="reported to the scheduler; 0 = no limit")
    p.add_argument("--socket-group", default=None, help="group allowed to use the socket (mode 0660)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument(
        "--metrics-address", default=None, help="serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9808)"
    )
    p.add_argument("--command-timeout", type=float, default=120.0, help="seconds before an external command is killed")
    p.add_argument(
        "--max-concurrent-rpcs", type=int, default=256, help="RPCs served at once; more get RESOURCE_EXHAUSTED"
    )
    p.add_argument("--xfs-config", default=None, help="mkfs.xfs options file (-c options=FILE), e.g. an lts_*.conf")
    p.add_argument("--state-dir", default=None, help="per-boot state (default /run/elv/<hash of the endpoint>)")
    p.add_argument(
        "--tool-path", default=Config.tool_path, help="PATH searched for external tools (mkfs, losetup, ...)"
    )
    p.add_argument("--no-direct-io", action="store_true", help="attach loop devices without direct I/O")
    p.add_argument(
        "--kubernetes-api",
        default=None,
        metavar="in-cluster|KUBECONFIG",
        help="use the Kubernetes API (the DaemonSet sets in-cluster): hand VolumeAttributesClass changes to the "
        "node that holds the volume, and claim group snapshot contents for this node",
    )


def add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="walk one volume through its whole life and clean up")
    p.add_argument(
        "--endpoint",
        default=None,
        help="use a running driver at this endpoint; by default start a private one in a temp dir",
    )
    p.add_argument("--kubelet-dir", default="/var/lib/kubelet", help="the running driver's --kubelet-dir")
    p.add_argument("--loop-dir", default=None, help="the running driver's --loop-dir (to check for leftovers)")


def parser() -> argparse.ArgumentParser:
    from csi.bench import main as bench
    from csi.cmd import attach, doctor, volumes
    from csi.cmd.dockerplugin import main as docker_plugin

    p = argparse.ArgumentParser(prog="elv", description="ELV: Elastic Local Volumes, a CSI driver")
    p.add_argument("--version", action="version", version=f"elv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add_serve(sub)
    add_demo(sub)
    endpoint = _env("CSI_ENDPOINT", "unix:///run/elv/csi.sock")
    volumes.add_parsers(sub, endpoint)
    attach.add_parsers(sub, endpoint)
    doctor.add_parser(sub, endpoint)
    docker_plugin.add_parser(sub, endpoint)
    bench.add_parser(sub)
    return p


def config_from(args: argparse.Namespace) -> Config:
    if args.overprovision_ratio < 1.0:
        raise SystemExit("elv: --overprovision-ratio must be at least 1.0")
    cfg = Config(
        endpoint=args.endpoint,
        node_id=args.node_id,
        backend=args.backend,
        mode=Mode(args.mode),
        driver_name=args.driver_name,
        loop_dir=os.path.abspath(args.loop_dir),
        kubelet_dir=os.path.abspath(args.kubelet_dir),
        overprovision_ratio=args.overprovision_ratio,
        max_volumes_per_node=args.max_volumes_per_node,
        node_expansion_only=args.node_expansion_only,
        socket_group=args.socket_group,
        log_level=args.log_level,
        log_format=args.log_format,
        metrics_address=args.metrics_address,
        command_timeout=args.command_timeout,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        direct_io=not args.no_direct_io,
        xfs_config=args.xfs_config,
        tool_path=args.tool_path,
        state_dir=args.state_dir,
        lvm_config=args.lvm_config,
        lvm_vg=args.lvm_vg,
        lvm_thin_pool=args.lvm_thin_pool,
        lvm_devices=args.lvm_devices,
        kubernetes_api=args.kubernetes_api,
    )
    try:
        cfg.socket_path  # noqa: B018 - validates the endpoint
    except ValueError as e:
        raise SystemExit(f"elv: {e}") from None
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        from csi.server import driver, log

        cfg = config_from(args)
        log.setup(cfg.log_level, cfg.log_format)
        try:
            return asyncio.run(driver.run(cfg))
        except ConfigError as e:
            # The backend refused the configuration while it was being built.
            print(f"elv: {e.message}", file=sys.stderr)
            return 1
    if args.command == "demo":
        from csi.cmd import demo
        from csi.server import log

        log.setup("warning")
        return asyncio.run(demo.main(args.endpoint, args.kubelet_dir, args.loop_dir))
    return _tool(args)


def _tool(args: argparse.Namespace) -> int:
    from csi.cmd import attach, doctor, volumes
    from csi.cmd.common import CliError

    try:
        if args.command == "volume":
            return asyncio.run(volumes.run(args))
        if args.command == "attach":
            return asyncio.run(attach.attach(args))
        if args.command == "detach":
            return asyncio.run(attach.detach(args))
        if args.command == "doctor":
            return doctor.run(args)
        if args.command == "docker-plugin":
            from csi.cmd.dockerplugin import main as docker_plugin
            from csi.server import log

            log.setup(args.log_level)
            return docker_plugin.run(args)
        if args.command == "bench":
            from csi.bench import main as bench

            return bench.main(args)
    except CliError as e:
        print(f"elv: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  {e.hint}", file=sys.stderr)
        return e.status
    return 2


if __name__ == "__main__":
    sys.exit(main())
