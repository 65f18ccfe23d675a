"""PathGuard without mounts: validation, and descriptor walking on a tmp tree."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from csi.errors import FailedPrecondition, InvalidArgument, NotFound
from csi.host import syscalls
from csi.host.paths import MAX_PATH_BYTES, PathGuard


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "kubelet"
    r.mkdir()
    return r


@pytest.fixture
def guard(root: Path) -> PathGuard:
    return PathGuard(str(root))


def tree(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*"))


def test_root_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        PathGuard("var/lib/kubelet")


def test_relative_returns_the_components(guard: PathGuard, root: Path) -> None:
    assert guard.relative(f"{root}/pods/uid/volumes/mount", "target_path") == ["pods", "uid", "volumes", "mount"]
    assert guard.relative(f"{root}/x", "target_path") == ["x"]


@pytest.mark.parametrize(
    ("suffix", "match"),
    [
        ("/pods/../../etc", "normalised"),
        ("/pods/../plugins/x", "normalised"),
        ("/a/./b", "normalised"),
        ("/a//b", "normalised"),
        ("/a/b/", "normalised"),
        ("/a/b/.", "normalised"),
    ],
)
def test_relative_refuses_non_normalised_paths(guard: PathGuard, root: Path, suffix: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        guard.relative(f"{root}{suffix}", "target_path")


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("", "target_path is required"),
        ("pods/uid/mount", "must be an absolute path"),
        ("./pods", "must be an absolute path"),
        ("//etc/passwd", "normalised"),
        ("/etc/passwd", "beneath the kubelet directory"),
        ("/", "beneath the kubelet directory"),
    ],
)
def test_relative_refuses_bad_paths(guard: PathGuard, path: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        guard.relative(path, "target_path")


def test_relative_refuses_the_root_itself_and_siblings(guard: PathGuard, root: Path) -> None:
    for p in (str(root), f"{root}-other/x", f"{root}x/y", str(root.parent)):
        with pytest.raises(InvalidArgument, match="beneath the kubelet directory"):
            guard.relative(p, "target_path")
    with pytest.raises(InvalidArgument):
        guard.relative(f"/{root}/x", "target_path")  # leading "//"


def test_relative_refuses_nul_and_overlong_paths(guard: PathGuard, root: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a valid path"):
        guard.relative(f"{root}/a\x00b", "target_path")
    base = f"{root}/"
    long = base + "a" * (MAX_PATH_BYTES - len(base.encode()))
    assert len(long.encode()) == MAX_PATH_BYTES
    guard.relative(long, "target_path")  # exactly at the limit is fine
    with pytest.raises(InvalidArgument, match="not a valid path"):
        guard.relative(long + "a", "target_path")
    # The limit is in bytes.
    mb = base + "é" * ((MAX_PATH_BYTES - len(base.encode())) // 2 + 1)
    assert len(mb) < MAX_PATH_BYTES < len(mb.encode())
    with pytest.raises(InvalidArgument, match="not a valid path"):
        guard.relative(mb, "target_path")


def test_make_creates_directories_and_parents(guard: PathGuard, root: Path) -> None:
    path = f"{root}/plugins/kubernetes.io/csi/elv/abc/globalmount"
    assert guard.make(path, "staging_target_path", want_dir=True) is True
    assert os.path.isdir(path)
    assert guard.make(path, "staging_target_path", want_dir=True) is False


def test_make_creates_an_empty_file_for_raw_block(guard: PathGuard, root: Path) -> None:
    path = f"{root}/plugins/volumeDevices/publish/pvc/pod"
    assert guard.make(path, "target_path", want_dir=False) is True
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode)
    assert st.st_size == 0
    assert guard.make(path, "target_path", want_dir=False) is False


def test_make_does_not_follow_a_symlink_in_the_middle(guard: PathGuard, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "pods").mkdir()
    (root / "pods" / "uid").symlink_to(outside)
    for want_dir in (True, False):
        with pytest.raises(InvalidArgument, match="symlink"):
            guard.make(f"{root}/pods/uid/volumes/mount", "target_path", want_dir=want_dir)
    assert tree(outside) == []


def test_make_does_not_follow_a_dangling_symlink(guard: PathGuard, root: Path, tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    (root / "pods").symlink_to(target)
    with pytest.raises(InvalidArgument, match="symlink"):
        guard.make(f"{root}/pods/uid/mount", "target_path", want_dir=True)
    assert not target.exists()


@pytest.mark.parametrize("want_dir", [True, False])
def test_a_symlink_as_the_final_component_is_not_followed(
    guard: PathGuard, root: Path, tmp_path: Path, want_dir: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts: list[tuple[object, ...]] = []
    monkeypatch.setattr(syscalls, "mount", lambda *a: mounts.append(a))
    outside = tmp_path / "outside"
    outside.mkdir()
    link = root / "mount"
    link.symlink_to(outside / "target")
    # make() refuses it, without following it or creating anything at its target ...
    with pytest.raises(InvalidArgument, match="is a symlink"):
        guard.make(str(link), "target_path", want_dir=want_dir)
    assert tree(outside) == []
    assert link.is_symlink()
    # ... and every operation that would use it refuses it.
    with pytest.raises(InvalidArgument, match="is a symlink"), guard.open(str(link), "target_path", want_dir=want_dir):
        pass
    with pytest.raises(InvalidArgument, match="is a symlink"):
        guard.mount(str(link), "target_path", want_dir=want_dir, source="/dev/null", fstype=None, flags=0, data=None)
    assert mounts == []


def test_a_component_that_is_a_file_is_refused(guard: PathGuard, root: Path) -> None:
    (root / "pods").write_text("")
    with pytest.raises(InvalidArgument, match="not a directory"):
        guard.make(f"{root}/pods/uid/mount", "target_path", want_dir=True)


def test_open_checks_the_type(guard: PathGuard, root: Path) -> None:
    (root / "dir").mkdir()
    (root / "file").write_text("")
    with guard.open(f"{root}/dir", "target_path", want_dir=True) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
    with pytest.raises(FailedPrecondition, match="not a directory"), guard.open(f"{root}/file", "p", want_dir=True):
        pass
    with pytest.raises(FailedPrecondition, match="not a regular file"), guard.open(f"{root}/dir", "p", want_dir=False):
        pass
    with pytest.raises(NotFound, match="does not exist"), guard.open(f"{root}/missing", "p", want_dir=True):
        pass
    # None: anything but a symlink (a device node bound onto a raw block target).
    for name in ("dir", "file"):
        with guard.open(f"{root}/{name}", "p", want_dir=None) as fd:
            assert fd >= 0
    (root / "link").symlink_to(root / "dir")
    with pytest.raises(InvalidArgument, match="symlink"), guard.open(f"{root}/link", "p", want_dir=None):
        pass
    with pytest.raises(NotFound), guard.open(f"{root}/missing/deeper", "p", want_dir=True):
        pass


def test_lstat(guard: PathGuard, root: Path) -> None:
    (root / "d").mkdir()
    (root / "link").symlink_to("/etc")
    st = guard.lstat(f"{root}/d", "p")
    assert st is not None
    assert stat.S_ISDIR(st.st_mode)
    link = guard.lstat(f"{root}/link", "p")
    assert link is not None
    assert stat.S_ISLNK(link.st_mode)
    assert guard.lstat(f"{root}/missing", "p") is None
    assert guard.lstat(f"{root}/missing/deeper", "p") is None
    # Beneath a file, or beneath a symlink (never followed): not there either.
    (root / "f").touch()
    assert guard.lstat(f"{root}/f/deeper", "p") is None
    assert guard.lstat(f"{root}/link/passwd", "p") is None


def test_remove_is_idempotent(guard: PathGuard, root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").touch()
    assert guard.remove(f"{root}/d", "p") is True
    assert guard.remove(f"{root}/f", "p") is True
    assert tree(root) == []
    assert guard.remove(f"{root}/d", "p") is True
    assert guard.remove(f"{root}/f", "p") is True
    assert guard.remove(f"{root}/missing/deeper", "p") is True


def test_remove_keeps_anything_that_holds_data(guard: PathGuard, root: Path) -> None:
    (root / "d").mkdir()
    (root / "d" / "data").write_text("precious")
    (root / "f").write_text("precious too")
    assert guard.remove(f"{root}/d", "p") is False
    assert guard.remove(f"{root}/f", "p") is False
    assert (root / "d" / "data").read_text() == "precious"
    assert (root / "f").read_text() == "precious too"


def test_remove_keeps_a_symlink_and_never_follows_it(guard: PathGuard, root: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (root / "link").symlink_to(victim)
    assert guard.remove(f"{root}/link", "p") is False
    assert (root / "link").is_symlink()
    assert victim.is_dir()


def test_make_records_what_it_created(guard: PathGuard, root: Path) -> None:
    (root / "pods").mkdir()
    created: list[str] = []
    assert guard.make(f"{root}/pods/uid/volumes/mount", "p", want_dir=True, created=created) is True
    assert created == [f"{root}/pods/uid", f"{root}/pods/uid/volumes", f"{root}/pods/uid/volumes/mount"]
    again: list[str] = []
    assert guard.make(f"{root}/pods/uid/volumes/mount", "p", want_dir=True, created=again) is False
    assert again == []
    for path in reversed(created):
        assert guard.remove(path, "p") is True
    assert tree(root) == ["pods"]


def test_device_of_a_path(guard: PathGuard, root: Path) -> None:
    (root / "f").touch()
    (root / "d").mkdir()
    assert guard.device(f"{root}/f", "p") is None
    assert guard.device(f"{root}/d", "p") is None
    assert guard.device(f"{root}/missing", "p") is None
    (root / "link").symlink_to("/dev/null")
    assert guard.device(f"{root}/link", "p") is None  # not followed (and /dev/null is not a block device)


def test_a_root_that_is_a_symlink_works(tmp_path: Path) -> None:
    real = tmp_path / "data" / "kubelet"
    real.mkdir(parents=True)
    link = tmp_path / "kubelet-link"
    link.symlink_to(real)
    guard = PathGuard(str(link))
    path = f"{link}/pods/uid/mount"
    assert guard.real(path) == f"{real}/pods/uid/mount"
    assert guard.make(path, "target_path", want_dir=True) is True
    assert (real / "pods" / "uid" / "mount").is_dir()
    assert guard.lstat(path, "target_path") is not None
    with guard.open(path, "target_path", want_dir=True):
        pass
    guard.remove(path, "target_path")
    assert not (real / "pods" / "uid" / "mount").exists()
    # Paths are checked against the configured root, not its resolved form.
    with pytest.raises(InvalidArgument, match="beneath the kubelet directory"):
        guard.relative(f"{real}/pods/uid/mount", "target_path")


def test_root_is_normalised(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    guard = PathGuard(f"{tmp_path}/./k/")
    assert guard.root == f"{tmp_path}/k"
    assert guard.relative(f"{tmp_path}/k/x", "p") == ["x"]
