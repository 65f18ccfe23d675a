"""The loop backend: one sparse (or thick) file per volume, attached as a loop device."""

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
