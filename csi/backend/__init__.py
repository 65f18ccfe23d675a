"""Storage backends: the contract (base.py), and the loop and LVM backends.

Every backend keeps the contract in base.py: ControllerBackend for the
controller services, NodeBackend for csi.node, and a ``build(config, runner)``
in its package that raises ConfigError for a configuration it cannot serve.
:func:`build` picks the one the configuration names.

Imports host, config, model and errors; never the node work, the services,
the server or a tool (import-linter holds that).
"""

from __future__ import annotations

from csi.backend.base import Backend
from csi.config import Config
from csi.errors import ConfigError
from csi.host.runner import Runner


def build(config: Config, runner: Runner) -> Backend:
    """The backend ``config`` names, built by that backend's own ``build``
    (imported here, so a driver loads only the backend it runs)."""
    if config.backend == "loop":
        from csi.backend import loop

        return loop.build(config, runner)
    if config.backend == "lvm":
        from csi.backend import lvm

        return lvm.build(config, runner)
    raise ConfigError(f"unknown backend {config.backend!r}")
