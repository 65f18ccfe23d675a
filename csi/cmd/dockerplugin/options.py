"""The ``--opt`` values of ``docker volume create -d elv`` (and Podman's),
checked into a plan before anything is asked of the driver.

Every option is an allow-listed key with a checked value; an unknown key is
refused with the list of the allowed ones, since the engine prints the
message as-is and it is all the user sees.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from csi.cmd.common import CliError, parse_size
from csi.model import SUPPORTED_FS

ALLOWED = {
    "size": "e.g. 1G, 512Mi or a number of bytes",
    "fs": " or ".join(SUPPORTED_FS),
    "provisioning": "thin or thick",
    "from": "a snapshot or a volume to copy",
}
#: A size larger than this is a typo, not a request (the driver would refuse it anyway).
MAX_SIZE = 1 << 50
#: Docker's own rule for volume names, which Podman follows too.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


class OptionError(ValueError):
    """A message for the engine to print."""


@dataclass(frozen=True)
class Plan:
    size: int | None = None
    fs: str | None = None
    thick: bool = False
    source: str | None = None

    @property
    def empty(self) -> bool:
        return self == Plan()


def volume_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise OptionError(
            f"invalid volume name {name!r}: use 1-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return name


def _allowed() -> str:
    return ", ".join(f"{k} ({v})" for k, v in ALLOWED.items())


def _size(text: str) -> int:
    try:
        n = parse_size(text)
    except CliError as e:
        raise OptionError(f"size={text!r}: not a size; use {ALLOWED['size']}") from e
    if n <= 0 or n > MAX_SIZE:
        raise OptionError(f"size={text!r}: must be more than 0 and at most 1 PiB")
    return n


def plan(opts: object) -> Plan:
    """The plan for these options, or OptionError saying what is wrong."""
    if opts is None:
        return Plan()
    if not isinstance(opts, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in opts.items()):
        raise OptionError("the options must be a map of strings")
    unknown = sorted(k for k in opts if k not in ALLOWED)
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}; the elv volume driver takes: {_allowed()}")
    fs = opts.get("fs")
    if fs is not None and fs not in SUPPORTED_FS:
        raise OptionError(f"fs={fs!r}: use {ALLOWED['fs']}")
    provisioning = opts.get("provisioning")
    if provisioning is not None and provisioning not in ("thin", "thick"):
        raise OptionError(f"provisioning={provisioning!r}: use thin or thick")
    source = opts.get("from")
    if source is not None and (not source or len(source.encode()) > 128 or not source.isprintable()):
        raise OptionError(f"from={source!r}: name a snapshot or a volume (its name or ID)")
    return Plan(
        size=_size(opts["size"]) if "size" in opts else None,
        fs=fs,
        thick=provisioning == "thick",
        source=source,
    )
