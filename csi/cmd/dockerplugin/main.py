"""``elv docker-plugin``: serve the volume plugin, or write Podman's entry for it.

Docker finds a plugin by its socket's name in /run/docker/plugins (there is
no flag to look elsewhere); Podman by an ``[engine.volume_plugins]`` entry in
containers.conf. The plugin's name is the socket's file name without
``.sock``: ``elv`` by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import tempfile

from csi.cmd.client import Client, NoDriver
from csi.cmd.common import CliError
from csi.cmd.dockerplugin import wire
from csi.cmd.dockerplugin.volumes import Plugin
from csi.errors import ElvError
from csi.host.sockets import prepare_socket

log = logging.getLogger("csi.docker-plugin")

DEFAULT_SOCKET = "/run/docker/plugins/elv.sock"
PODMAN_CONF = "/etc/containers/containers.conf.d/50-elv-volume-plugin.conf"
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], endpoint: str) -> None:
    p = sub.add_parser(
        "docker-plugin",
        help="serve ELV volumes to Docker and Podman (volume plugin protocol v1)",
        description="Serve the Docker volume plugin protocol on a unix socket, as a client of the "
        "driver's CSI socket. Options of `docker volume create -d elv -o K=V`: size, fs, provisioning, from.",
    )
    p.add_argument("--endpoint", default=endpoint, help="the driver's CSI socket (env CSI_ENDPOINT)")
    p.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help="the plugin's socket; its file name without .sock is the driver name engines use (default: %(default)s)",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    p.add_argument(
        "--podman-conf",
        action="store_true",
        help="print the containers.conf entry that tells Podman about this plugin, and exit",
    )
    p.add_argument(
        "--write",
        nargs="?",
        const=PODMAN_CONF,
        default=None,
        metavar="FILE",
        help=f"with --podman-conf: write the entry into FILE (default {PODMAN_CONF}) instead of printing it",
    )


def plugin_name(socket_path: str) -> str:
    base = os.path.basename(socket_path)
    name = base[: -len(".sock")] if base.endswith(".sock") else ""
    if not socket_path.startswith("/") or not _NAME.match(name):
        raise CliError(
            f"--socket {socket_path!r} must be an absolute path to NAME.sock, NAME being letters, digits, '_', '.', '-'",
            "e.g. /run/docker/plugins/elv.sock (Docker looks for plugins in /run/docker/plugins)",
        )
    return name


def podman_entry(socket_path: str) -> str:
    name = plugin_name(socket_path)
    return (
        "# Written by `elv docker-plugin --podman-conf --write`: Podman's volume driver "
        f'"{name}" is ELV.\n'
        f'[engine.volume_plugins]\n{name} = "{socket_path}"\n'
    )


def write_atomically(path: str, text: str) -> None:
    """tmp file, fsync, rename, fsync the directory: never a half-written config."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".elv-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def run(args: argparse.Namespace) -> int:
    if args.podman_conf:
        entry = podman_entry(args.socket)
        if args.write is None:
            print(entry, end="")
            return 0
        write_atomically(args.write, entry)
        print(f"wrote {args.write}: podman volume create --driver {plugin_name(args.socket)} ... now uses ELV")
        return 0
    if args.write is not None:
        raise CliError("--write goes with --podman-conf")
    if os.geteuid() != 0:
        raise CliError("elv docker-plugin needs root (it mounts volumes for the engines)", "run it with sudo")
    return asyncio.run(serve(args.endpoint, args.socket))


async def serve(endpoint: str, socket_path: str) -> int:
    name = plugin_name(socket_path)
    try:
        prepare_socket(socket_path)
    except ElvError as e:
        raise CliError(e.message) from None
    async with Client(endpoint) as client:
        try:
            info = await client.wait_ready(timeout=30)
        except NoDriver as e:
            raise CliError(str(e), f"start the driver first: elv serve --endpoint {endpoint}") from None
        p = Plugin(client, name)
        await p.recover()
        old = os.umask(0o177)  # born 0600: only root (the engines) may call it
        try:
            server = await wire.serve(socket_path, p.dispatch)
        finally:
            os.umask(old)
        log.info(
            "serving the volume plugin",
            extra={"fields": {"socket": socket_path, "name": name, "driver": info.name, "endpoint": client.endpoint}},
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            # Stop answering, and leave every volume mounted: containers keep
            # using them, and the next start takes over their references.
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
            log.info("stopped; mounted volumes stay mounted for their containers")
    return 0
