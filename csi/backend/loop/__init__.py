"""The loop backend: one sparse (or thick) file per volume, attached as a loop device.

backend.py (LoopBackend) with store.py (the pool on disk: the metadata file
is the commit point), snapshots.py (reflink or sparse copies, frozen
groups), alloc.py (allocated bytes without a scan per request) and files.py
(the image files).

Imports the contract (csi.backend.base, freeze), host, config, model and
errors, as every backend may; nothing above.
"""

from __future__ import annotations

from csi.backend.loop.backend import LoopBackend
from csi.config import Config
from csi.errors import ConfigError
from csi.host.runner import Runner


def build(config: Config, runner: Runner) -> LoopBackend:
    if config.overprovision_ratio < 1.0:
        raise ConfigError("the overprovision ratio must be at least 1.0")
    return LoopBackend(
        config.loop_dir, runner, overprovision_ratio=config.overprovision_ratio, direct_io=config.direct_io
    )
