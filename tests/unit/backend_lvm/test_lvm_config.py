"""Device classes from flags and from the TOML file; StorageClass parameters;
capacity arithmetic; the lvm --config string. Pure: no LVM, no root."""

from __future__ import annotations

import pytest

from csi.backend.lvm import capacity, classes, params
from csi.backend.lvm.command import config_string
from csi.errors import ConfigError, InvalidArgument
from csi.model import DEVICE_CLASS, round_up
from tests.support.fake_lvm import CLASSES

GiB = 1024**3
MiB = 1024**2

GOOD = f"""
default-class = "thin"
udev = "off"
monitoring = false
{CLASSES}overprovision-ratio = 4.0
full-threshold = 85
"""


def test_config_file() -> None:
    s = classes.parse_config(GOOD)
    assert s.default == "thin" and s.udev == "off" and s.monitoring is False
    assert s.vgs == ["vg0"]
    assert s.pick({}).name == "thin"
    thick = s.pick({DEVICE_CLASS: "thick"})
    assert not thick.thin and thick.vg == "vg0"
    thin = s.classes["thin"]
    assert thin.thin and thin.overprovision_ratio == 4.0 and thin.full_threshold == 85
    with pytest.raises(InvalidArgument):
        s.pick({DEVICE_CLASS: "ssd"})
    assert s.query_shell and s.change_shell  # resident lvm shells unless told otherwise


@pytest.mark.parametrize("key", ["query-shell", "change-shell"])
def test_each_shell_can_be_turned_off_and_must_be_a_boolean(key: str) -> None:
    s = classes.parse_config(f"{key} = false\n" + GOOD)
    assert (s.query_shell, s.change_shell) == (key != "query-shell", key != "change-shell")
    with pytest.raises(ConfigError, match=key):
        classes.parse_config(f'{key} = "no"\n' + GOOD)


@pytest.mark.parametrize(
    "text",
    [
        "",  # no classes
        "nonsense = 1\n[[device-class]]\nname='a'\nvg='v'",
        "[[device-class]]\nname='A'\nvg='v'",  # class names become part of IDs
        "[[device-class]]\nname='a'\nvg='-v'",  # would read as an option
        "[[device-class]]\nname='a'\nvg='v'\nthin-pool='p'\noverprovision-ratio=0.5",
        "[[device-class]]\nname='a'\nvg='v'\noverprovision-ratio=2.0",  # ratio without a pool
        "[[device-class]]\nname='a'\nvg='v'\n[[device-class]]\nname='a'\nvg='w'",
        "default-class='b'\n[[device-class]]\nname='a'\nvg='v'",
        "udev='maybe'\n[[device-class]]\nname='a'\nvg='v'",
        "[[device-class]]\nname='a'\nvg='v'\nthin-pool='p'\n[[device-class]]\nname='b'\nvg='v'\nthin-pool='p'",
        "[[device-class]]\nname='a'\nvg='v'\nthin-pool-size='lots'",
        "[[device-class]]\nname='a'\nvg='v'\ncolour='red'",
        "not toml [",
    ],
)
def test_bad_config(text: str) -> None:
    with pytest.raises(ConfigError):
        classes.parse_config(text)


def test_flags() -> None:
    s = classes.from_flags("vg1", "pool", None, 3.0)
    assert s.default == "default" and s.classes["default"].thin_pool == "pool"
    assert s.classes["default"].overprovision_ratio == 3.0
    assert classes.from_flags("vg1", None, None, 3.0).classes["default"].overprovision_ratio == 1.0
    with pytest.raises(ConfigError):
        classes.from_flags(None, None, None, 1.0)


def test_layout_parameters() -> None:
    s = classes.parse_config(GOOD)
    thick, thin = s.classes["thick"], s.classes["thin"]
    assert params.layout({}, thick) == params.Layout((), 1, 100)
    assert params.layout({params.TYPE: "raid1", params.MIRRORS: "2"}, thick).args == ("--type", "raid1", "-m", "2")
    assert params.layout({params.TYPE: "raid1", params.MIRRORS: "2"}, thick).copies == 3
    striped = params.layout({params.TYPE: "striped", params.STRIPES: "3", params.STRIPE_SIZE: "1Mi"}, thick)
    assert striped.args == ("-i", "3", "-I", "1m")
    assert params.layout({params.SNAPSHOT_RESERVE: "25%"}, thick).snapshot_reserve == 25
    for bad, cls in [
        ({params.TYPE: "raid5"}, thick),
        ({params.TYPE: "raid1"}, thin),
        ({params.SNAPSHOT_RESERVE: "50%"}, thin),
        ({params.STRIPES: "2"}, thick),
        ({params.MIRRORS: "1"}, thick),
        ({params.TYPE: "striped", params.STRIPES: "2; rm -rf /"}, thick),
    ]:
        with pytest.raises(InvalidArgument):
            params.layout(bad, cls)


def test_param_values_are_registered_with_the_validator() -> None:
    # The controller service validates against the backend's declaration,
    # the one layout() reads: a value outside a closed set never gets this far.
    from csi.backend.lvm.backend import LvmBackend
    from csi.services import validation

    declared = LvmBackend.parameters.values
    for key, allowed in params.PARAMETERS.values.items():
        assert declared[key] == allowed
        if allowed is not None:
            with pytest.raises(InvalidArgument, match="is not one of"):
                validation.parameters({key: "bogus"}, declared)


def test_thin_capacity_formula() -> None:
    # Ratio 1: exact promise; every thin LV in the pool counts, snapshots too.
    assert capacity.thin_available(10 * GiB, 0.0, 5.0, 4 * GiB, 1.0, 90.0) == 6 * GiB
    # Overprovisioning promises ratio x pool minus what is promised already...
    assert capacity.thin_available(10 * GiB, 10.0, 5.0, 4 * GiB, 4.0, 90.0) == 36 * GiB
    # ...but never more than ratio x what the data area still holds.
    assert capacity.thin_available(10 * GiB, 80.0, 5.0, 0, 4.0, 90.0) == 8 * GiB
    # Promised beyond the ratio: zero, never a wrapped-around huge number (TL #961).
    assert capacity.thin_available(10 * GiB, 0.0, 5.0, 50 * GiB, 2.0, 90.0) == 0
    # Nearly full data or metadata: nothing.
    assert capacity.thin_available(10 * GiB, 91.0, 5.0, 0, 4.0, 90.0) == 0
    assert capacity.thin_available(10 * GiB, 1.0, 95.0, 0, 4.0, 90.0) == 0
    # Reservations of creates in flight.
    assert capacity.thin_available(10 * GiB, 0.0, 0.0, 0, 1.0, 90.0, reserved=GiB) == 9 * GiB


def test_thick_capacity() -> None:
    assert capacity.thick_available(10 * GiB + 3 * MiB, 4 * MiB) == 10 * GiB
    assert capacity.thick_available(10 * GiB, 4 * MiB, reserved=GiB) == 9 * GiB
    assert capacity.thick_available(10 * GiB, 4 * MiB, copies=2) == 5 * GiB
    assert capacity.thick_available(GiB, 4 * MiB, reserved=2 * GiB) == 0
    assert round_up(1, 4 * MiB) == 4 * MiB and round_up(8 * MiB, 4 * MiB) == 8 * MiB


def test_config_string() -> None:
    assert config_string(udev=True, monitoring=None) == ""
    no_udev = config_string(udev=False, monitoring=False)
    assert "activation{udev_sync=0 udev_rules=0 verify_udev_operations=1 monitoring=0}" in no_udev
    assert "devices{obtain_device_list_from_udev=0}" in no_udev


def test_device_selector() -> None:
    from csi.backend.lvm import selector as disks

    sel = disks.parse_selector("path=/dev/disk/by-id/nvme-*,model=Samsung*,min-size=100G")
    assert sel == disks.Selector("/dev/disk/by-id/nvme-*", "Samsung*", None, 100 * GiB)
    disk = disks.Disk(
        "/dev/nvme0n1", ("/dev/disk/by-id/nvme-Samsung_X",), "Samsung SSD", "S4E", 512 * GiB, 0, 0, False, 259, 0
    )
    assert disks.matches(sel, disk)
    assert not disks.matches(disks.parse_selector("path=/dev/sd*"), disk)
    assert not disks.matches(disks.parse_selector("serial=X*"), disk)
    assert not disks.matches(disks.parse_selector("model=*,min-size=1T"), disk)
    for bad in ["", "path", "min-size=1G", "path=a,path=b", "colour=red", "path=/dev/x,min-size=lots"]:
        with pytest.raises(ConfigError):
            disks.parse_selector(bad)
    with pytest.raises(ConfigError):
        classes.from_flags("vg", None, "model", 1.0)
