"""Tool wrappers for ``--tool-path`` that make the Nth call of a command
fail or hang, so a test can land a failure or a kill at an exact point of an
operation; and the checks those tests share (a filesystem is not left
frozen, a small pool that really fills up)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

#: The driver's default search path, after the wrappers.
SAFE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MiB = 1024 * 1024


@dataclass
class Wrapper:
    """``name`` in ``directory``: counts the calls that match ``match`` (a
    shell ``case`` pattern on all arguments); the ``fail_at``-th fails with
    ``message`` on stderr, the ``hang_at``-th touches ``reached`` and waits
    while ``hold`` exists, then fails (it never runs the real tool late)."""

    directory: str
    name: str
    match: str = "*"
    fail_at: int = 0
    hang_at: int = 0
    message: str = "injected failure"

    @property
    def counter(self) -> str:
        return os.path.join(self.directory, f".{self.name}.count")

    @property
    def reached(self) -> str:
        return os.path.join(self.directory, f".{self.name}.reached")

    @property
    def hold(self) -> str:
        return os.path.join(self.directory, f".{self.name}.hold")

    @property
    def tool_path(self) -> str:
        return f"{self.directory}:{SAFE}"

    def install(self) -> Wrapper:
        os.makedirs(self.directory, exist_ok=True)
        real = shutil.which(self.name, path=SAFE)
        assert real, f"{self.name} is not installed"
        if self.hang_at:
            open(self.hold, "w").close()
        script = f"""#!/bin/sh
case "$*" in
{self.match})
    n=$(cat '{self.counter}' 2>/dev/null || echo 0); n=$((n + 1)); echo $n > '{self.counter}'
    if [ "$n" = "{self.fail_at}" ]; then echo '{self.message}' >&2; exit 1; fi
    if [ "$n" = "{self.hang_at}" ]; then
        touch '{self.reached}'
        while [ -e '{self.hold}' ]; do sleep 0.05; done
        exit 1
    fi;;
esac
exec {real} "$@"
"""
        path = os.path.join(self.directory, self.name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
        os.chmod(path, 0o755)
        return self

    def calls(self) -> int:
        try:
            with open(self.counter, encoding="ascii") as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def wait_reached(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.reached):
            assert time.monotonic() < deadline, f"the {self.hang_at}th {self.name} call never came"
            time.sleep(0.02)

    def release(self) -> None:
        """Let a hung call go (it then fails): after the driver is dead, or at cleanup."""
        if os.path.exists(self.hold):
            os.unlink(self.hold)


def frozen(mount_point: str) -> bool:
    """Whether the filesystem at ``mount_point`` is frozen, asked without
    writing to it (a write would hang). FIFREEZE on a frozen filesystem is
    EBUSY; on a thawed one it succeeds, and is undone at once."""
    res = subprocess.run(["fsfreeze", "--freeze", mount_point], capture_output=True, text=True, check=False)
    if res.returncode == 0:
        subprocess.run(["fsfreeze", "--unfreeze", mount_point], check=True)
        return False
    assert "busy" in res.stderr.lower(), res.stderr
    return True


def thaw(mount_point: str) -> None:
    """Force a thaw (cleanup after a failed test, so nothing hangs)."""
    subprocess.run(["fsfreeze", "--unfreeze", mount_point], check=False, capture_output=True)


def _loop_pool(base: str, size_mib: int, mkfs: list[str]) -> str:
    """Make a size_mib image with mkfs and mount it at base/pool."""
    img, pool = os.path.join(base, "pool.img"), os.path.join(base, "pool")
    with open(img, "wb") as f:
        f.truncate(size_mib * MiB)
    subprocess.run([*mkfs, img], check=True)
    os.makedirs(pool, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", img, pool], check=True)
    return pool


def small_pool(base: str, size_mib: int) -> str:
    """Mount a tiny ext4 filesystem at base/pool, so the pool can really fill up."""
    return _loop_pool(base, size_mib, ["mkfs.ext4", "-q", "-m", "0"])


def xfs_pool(base: str, size_mib: int) -> str:
    """Mount an xfs filesystem (which can reflink) at base/pool."""
    return _loop_pool(base, size_mib, ["mkfs.xfs", "-q", "-m", "reflink=1"])


def unmount_pool(base: str) -> None:
    subprocess.run(["umount", os.path.join(base, "pool")], check=False, capture_output=True)
