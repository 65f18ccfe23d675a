from __future__ import annotations

from pathlib import Path

import pytest

from csi.host import mountinfo
from csi.host.mountinfo import Mount, MountTable, parse, unescape

KUBELET = "/var/lib/kubelet"
GLOBAL = f"{KUBELET}/plugins/kubernetes.io/csi/elv.csi.dev/7c1b1e0f5f4d2a8e/globalmount"
POD_A = f"{KUBELET}/pods/0d3c0c6e-8a5f-4a8e-9d5c-2d1b6f0a7e11/volumes/kubernetes.io~csi/pvc-5e2b/mount"
POD_B = f"{KUBELET}/pods/5f7a9e4c-1b2d-4c3e-8f9a-0b1c2d3e4f5a/volumes/kubernetes.io~csi/pvc-5e2b/mount"
RAW = f"{KUBELET}/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-9a41/0d3c0c6e-8a5f-4a8e-9d5c-2d1b6f0a7e11"
STACKED = f"{KUBELET}/plugins/kubernetes.io/csi/elv.csi.dev/stacked/globalmount"


@pytest.fixture
def table(data_dir: Path) -> MountTable:
    return MountTable.load(str(data_dir / "mountinfo-node.txt"))


def test_parses_every_line(table: MountTable, data_dir: Path) -> None:
    lines = (data_dir / "mountinfo-node.txt").read_text().splitlines()
    assert len(table.mounts) == len(lines) == 17
    assert [m.mount_id for m in table.mounts][:3] == [22, 23, 24]


def test_fields_of_a_line_with_optional_fields(table: MountTable) -> None:
    (m,) = table.at("/run/user/1000")
    assert m == Mount(
        mount_id=45,
        parent_id=26,
        major=0,
        minor=40,
        root="/",
        mount_point="/run/user/1000",
        options=frozenset({"rw", "nosuid", "nodev", "relatime"}),
        fstype="tmpfs",
        source="tmpfs",
        super_options=frozenset(
            {"rw", "size=1631376k", "nr_inodes=407844", "mode=700", "uid=1000", "gid=1000", "inode64"}
        ),
    )
    assert not m.readonly


def test_line_without_optional_fields_and_escaped_backslash(table: MountTable) -> None:
    (m,) = table.at("/mnt/back\\slash")
    assert m.root == "/home/ci/a\\b"
    assert m.fstype == "ext4"
    assert m.source == "/dev/nvme0n1p2"
    assert m.super_options == frozenset({"rw"})


def test_escaped_space_and_same_filesystem_bind(table: MountTable) -> None:
    (bind,) = table.at("/mnt/team share")
    assert bind.root == "/srv/share"
    assert table.at("/mnt/team\\040share") == []
    (root,) = table.at("/")
    # Same device as its parent: os.path.ismount would miss it, the table does not.
    assert (bind.major, bind.minor) == (root.major, root.minor) == (259, 2)
    assert bind in table.of_device(259, 2)


def test_staging_and_publish_mounts_of_a_loop_device(table: MountTable) -> None:
    mounts = table.of_device(7, 3)
    assert [m.mount_point for m in mounts] == [GLOBAL, POD_A, POD_B]
    assert all(m.fstype == "ext4" and m.source == "/dev/loop3" for m in mounts)
    readonly = {m.mount_point: m.readonly for m in mounts}
    assert readonly == {GLOBAL: False, POD_A: False, POD_B: True}


def test_devtmpfs_bind_of_a_device_node(table: MountTable) -> None:
    (raw,) = table.of_device_node("loop4")
    assert raw.mount_point == RAW
    assert raw.root == "/loop4"
    assert raw.fstype == "devtmpfs"
    assert (raw.major, raw.minor) == (0, 6)
    assert table.of_device_node("loop3") == []
    assert table.of_device_node("loop") == []
    # /dev itself is devtmpfs too, but with root "/": not a bind of a device node.
    (dev,) = table.at("/dev")
    assert dev.fstype == "devtmpfs"
    assert dev not in table.of_device_node("loop4")


def test_a_node_bound_from_a_tmpfs_dev_is_a_bind_of_a_device_node() -> None:
    # In a container whose /dev is a tmpfs, ELV makes the node there; its bind shows as tmpfs.
    line = "90 31 0:55 /dm-3 /var/lib/kubelet/x/dev rw,relatime - tmpfs tmpfs rw"
    other = "91 31 0:56 /dm-3 /var/lib/kubelet/y/dev rw,relatime - ext4 /dev/sda1 rw"
    t = MountTable(parse(line + "\n" + other))
    assert [m.mount_id for m in t.of_device_node("dm-3")] == [90]


def test_stacked_mounts_top_is_the_last_mounted(table: MountTable) -> None:
    stack = table.at(STACKED)
    assert [m.mount_id for m in stack] == [80, 81]
    top = table.top(STACKED)
    assert top is not None
    assert top.mount_id == 81
    assert (top.major, top.minor) == (7, 6)


def test_stacked_top_does_not_depend_on_listing_order(data_dir: Path) -> None:
    mounts = parse((data_dir / "mountinfo-node.txt").read_text())
    t = MountTable(list(reversed(mounts)))
    top = t.top(STACKED)
    assert top is not None
    assert top.mount_id == 81


def test_stack_lists_the_visible_mount_first(table: MountTable, data_dir: Path) -> None:
    assert [m.mount_id for m in table.stack(STACKED)] == [81, 80]
    assert [m.mount_id for m in table.stack(GLOBAL)] == [60]
    assert table.stack("/nonexistent") == []
    reordered = MountTable(list(reversed(parse((data_dir / "mountinfo-node.txt").read_text()))))
    assert [m.mount_id for m in reordered.stack(STACKED)] == [81, 80]


def test_top_and_at_of_a_plain_path(table: MountTable) -> None:
    assert table.top("/nonexistent") is None
    assert table.at("/nonexistent") == []
    top = table.top(GLOBAL)
    assert top is not None
    assert top.mount_id == 60
    # A mount point is matched exactly, not as a prefix.
    assert table.top(GLOBAL + "x") is None
    assert table.top(GLOBAL.rsplit("/", 1)[0]) is None


def test_under(table: MountTable) -> None:
    under = {m.mount_id for m in table.under(KUBELET)}
    assert under == {60, 61, 62, 70, 80, 81}
    assert {m.mount_id for m in table.under(KUBELET + "/")} == under
    assert 31 not in under  # the kubelet dir itself is not beneath itself
    assert table.under("/var/lib/kube") == []


def test_super_options_and_overlay(table: MountTable) -> None:
    (ov,) = table.at("/run/containerd/io.containerd.runtime.v2.task/k8s.io/4f0a2c/rootfs")
    assert ov.fstype == "overlay"
    assert "lowerdir=/var/lib/containerd/snapshots/12/fs:/var/lib/containerd/snapshots/11/fs" in ov.super_options
    (kl,) = table.at(KUBELET)
    assert kl.fstype == "xfs"
    assert "noquota" in kl.super_options


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        ("a\\040b", "a b"),
        ("a\\011b", "a\tb"),
        ("a\\012b", "a\nb"),
        ("a\\134b", "a\\b"),
        ("a\\134040b", "a\\040b"),  # an escaped backslash followed by digits stays literal
        ("plain", "plain"),
        ("a\\04b", "a\\04b"),  # not three digits: left alone
    ],
)
def test_unescape(raw: str, text: str) -> None:
    assert unescape(raw) == text


@pytest.mark.parametrize(
    "line",
    [
        "garbage",
        "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 ext3 /dev/root rw",  # no separator
        "x 35 98:0 /mnt1 /mnt2 rw,noatime - ext3 /dev/root rw",  # non-numeric ID
        "36 35 98-0 /mnt1 /mnt2 rw,noatime - ext3 /dev/root rw",  # bad device numbers
        "36 35 98:x /mnt1 /mnt2 rw,noatime - ext3 /dev/root rw",
        "36 35 98:0 /mnt1 /mnt2 rw,noatime -",  # nothing after the separator
        "36 35 98:0 /mnt1 /mnt2 rw,noatime - ext3",  # no source
        "36 35 98:0 /mnt1 - ext3 /dev/root rw",  # too few fields before the separator
    ],
)
def test_malformed_line_raises_value_error(line: str) -> None:
    good = "22 28 0:21 / /sys rw - sysfs sysfs rw"
    with pytest.raises(ValueError, match="mountinfo line 2 is malformed"):
        parse(f"{good}\n{line}\n")


def test_blank_lines_are_skipped() -> None:
    mounts = parse("\n22 28 0:21 / /sys rw - sysfs sysfs rw\n\n")
    assert len(mounts) == 1
    assert mounts[0].mount_point == "/sys"


def test_reads_the_real_table_of_this_process() -> None:
    mounts = mountinfo.read()
    assert mounts, "a process always has at least its root mount"
    assert any(m.mount_point == "/" for m in mounts)
