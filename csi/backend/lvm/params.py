"""StorageClass parameters of the LVM backend: an allow-list with closed value sets.

:data:`PARAMETERS` is the backend's declaration: the controller service
validates every request against it before the backend sees one, and
:func:`layout` reads the same value sets. Only the device class (whose
names come from the configuration) is checked elsewhere, by the settings.
Nothing from a parameter is ever passed to LVM as text: each value maps to
fixed argv pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from csi.backend.base import Parameters, check_values
from csi.backend.lvm.classes import DeviceClass
from csi.errors import InvalidArgument
from csi.model import DEVICE_CLASS

TYPE = "elv.csi.dev/lvm-type"
STRIPES = "elv.csi.dev/lvm-stripes"
STRIPE_SIZE = "elv.csi.dev/lvm-stripe-size"
MIRRORS = "elv.csi.dev/lvm-mirrors"
SNAPSHOT_RESERVE = "elv.csi.dev/lvm-snapshot-reserve"

PARAMETERS = Parameters(
    values={
        DEVICE_CLASS: None,  # one of the configured classes: LvmSettings.pick checks it
        TYPE: frozenset({"linear", "striped", "raid1"}),
        STRIPES: frozenset({"2", "3", "4", "5", "6", "7", "8"}),
        STRIPE_SIZE: frozenset({"64Ki", "128Ki", "256Ki", "512Ki", "1Mi"}),
        MIRRORS: frozenset({"1", "2", "3"}),
        SNAPSHOT_RESERVE: frozenset({"10%", "25%", "50%", "100%"}),
    },
    # The class is part of the volume's ID already.
    placement=frozenset({DEVICE_CLASS}),
)
_STRIPE_SIZE_ARG = {"64Ki": "64k", "128Ki": "128k", "256Ki": "256k", "512Ki": "512k", "1Mi": "1m"}


@dataclass(frozen=True)
class Layout:
    #: Extra lvcreate arguments (fixed strings chosen from the value sets).
    args: tuple[str, ...] = ()
    #: How many times the data is stored (raid1: 1 + mirrors).
    copies: int = 1
    #: Percent of the origin a thick snapshot's copy-on-write store gets.
    snapshot_reserve: int = 100


def layout(parameters: Mapping[str, str], cls: DeviceClass) -> Layout:
    check_values(parameters, PARAMETERS.values, "parameter")
    kind = parameters.get(TYPE, "linear")
    reserve = int(parameters.get(SNAPSHOT_RESERVE, "100%").rstrip("%"))
    if cls.thin and (kind != "linear" or SNAPSHOT_RESERVE in parameters):
        raise InvalidArgument(
            f"device class {cls.name} is thin: {TYPE} and {SNAPSHOT_RESERVE} apply to thick classes only"
        )
    if kind != "striped" and (STRIPES in parameters or STRIPE_SIZE in parameters):
        raise InvalidArgument(f"{STRIPES} and {STRIPE_SIZE} need {TYPE}=striped")
    if kind != "raid1" and MIRRORS in parameters:
        raise InvalidArgument(f"{MIRRORS} needs {TYPE}=raid1")
    if kind == "striped":
        args = ("-i", parameters.get(STRIPES, "2"), "-I", _STRIPE_SIZE_ARG[parameters.get(STRIPE_SIZE, "64Ki")])
        return Layout(args, 1, reserve)
    if kind == "raid1":
        mirrors = parameters.get(MIRRORS, "1")
        return Layout(("--type", "raid1", "-m", mirrors), 1 + int(mirrors), reserve)
    return Layout((), 1, reserve)
