"""Real container engines for the tests: a private dockerd, a private Podman
store, ``elv docker-plugin`` in front of a test driver, a busybox image, and
a check of everything they may leave on the host.

Everything is private where the engine allows it (data root, exec root,
sockets, storage, runroot, tmpdir, cgroup parent, ``--network none``). What
it does not allow is recorded before the engine starts and removed after it
stops, only if this run created it:

- Docker finds plugins only in /run/docker/plugins (no flag or variable
  moves it in 20.10), so each test plugin has a unique name,
  ``elvtest-<pid>-<n>``, and its socket is removed at teardown;
- dockerd writes /etc/docker/key.json; its containerd puts shim sockets in
  /run/containerd/s; Podman's runc makes /run/runc, and containers/image its
  blob cache in /var/lib/containers/cache.

A run that is killed cannot tear down: ``tests.reap`` calls :func:`reap`,
which kills the engine processes a dead run left (found by an environment
marker and by their cgroups) and removes what its record lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from csi.host import loop as loopdev
from csi.host import scratch as scratch_dirs
from csi.host.mountinfo import MountTable
from tests.support.paths import REPO

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker may be a newer client than the daemon
PODMAN = "/usr/bin/podman"
IMAGE = "localhost/elv-busybox:test"
#: Set in every process an engine test starts, so a reaper finds the ones a killed run left.
MARKER = "ELV_ENGINE_RUN"
RECORD = "engines.json"
PLUGIN_DIR = "/run/docker/plugins"
#: Paths outside the scratch directory that the engines create when missing.
GLOBAL_PATHS = (
    "/run/docker/plugins",
    "/run/docker",
    "/run/containerd/s",
    "/run/containerd",
    "/run/runc",
    "/run/libpod",
    "/etc/docker/key.json",
    "/var/lib/containers/cache/blob-info-cache-v1.boltdb",
    "/var/lib/containers/cache",
    "/var/lib/containers",
)
CGROUP_ROOT = "/sys/fs/cgroup"
#: Cgroups an engine makes at the top when nothing tells it otherwise: removed
#: (if empty, never their processes: they may be another run's) if this run made them.
GLOBAL_CGROUPS = ("docker", "libpod_parent")
_seq = itertools.count(1)


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r  # type: ignore[no-any-return]


# -- the image ------------------------------------------------------------------------------


def busybox_rootfs_tar(path: str) -> str:
    """A root filesystem tarball of Debian's static busybox with every applet linked."""
    applets = run(["/bin/busybox", "--list"]).stdout.split()
    with tarfile.open(path, "w") as t:

        def add(name: str, data: bytes | None = None, mode: int = 0o644, link: str = "") -> None:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, 0
            if link:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                t.addfile(ti)
            elif data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))

        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            add(d, mode=0o1777 if d == "tmp" else 0o755)
        with open("/bin/busybox", "rb") as f:
            add("bin/busybox", f.read(), 0o755)
        for a in sorted(set(applets) - {"busybox"}):
            add(f"bin/{a}", link="busybox")
        add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    return path


# -- what engines leave on the host ---------------------------------------------------------


def cgroup_dirs(name: str) -> list[str]:
    """The cgroup directories called ``name`` at the top of each v1 hierarchy (and the v2 one)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for h in sorted(os.listdir(CGROUP_ROOT)):
            d = os.path.join(CGROUP_ROOT, h, name)
            if os.path.isdir(d):
                out.append(d)
    return out


def remove_cgroups(name: str, attempts: int = 50) -> list[str]:
    """rmdir every cgroup called ``name`` (deepest first); what could not be removed."""
    left: list[str] = []
    for _ in range(attempts):
        left = []
        for top in cgroup_dirs(name):
            for root, dirs, _files in sorted(os.walk(top, topdown=False), key=lambda w: -len(w[0])):
                del dirs
                try:
                    os.rmdir(root)
                except OSError:
                    left.append(root)
        if not left:
            return []
        time.sleep(0.1)  # a just-killed shim may still be leaving its cgroup
    return left


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for top in cgroup_dirs(name):
        for root, _dirs, files in os.walk(top):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError), open(os.path.join(root, "cgroup.procs")) as f:
                    pids |= {int(x) for x in f.read().split()}
    return pids


def marked_pids(base: str) -> set[int]:
    """Live processes whose environment carries this run's marker."""
    want = f"{MARKER}={base}".encode()
    out = set()
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{p}/environ", "rb") as f:
            if want in f.read().split(b"\0"):
                out.add(int(p))
    return out


def user_pids(uid: int) -> set[int]:
    out = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{p}").st_uid == uid:
                    out.add(int(p))
    return out


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Record:
    """What an engine test made outside its scratch directory, kept in the
    scratch directory so a reaper can undo it after a killed run."""

    base: str
    created: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    created_cgroups: list[str] = field(default_factory=list)
    dockerds: list[str] = field(default_factory=list)

    def save(self) -> None:
        tmp = os.path.join(self.base, RECORD + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f)
        os.rename(tmp, os.path.join(self.base, RECORD))

    @classmethod
    def load(cls, base: str) -> Record | None:
        try:
            with open(os.path.join(base, RECORD)) as f:
                return cls(**json.load(f))
        except (OSError, ValueError, TypeError):
            return None

    def note_globals(self) -> None:
        """Before an engine starts: remember which global paths do not exist yet."""
        for p in GLOBAL_PATHS:
            if not os.path.lexists(p) and p not in self.created:
                self.created.append(p)
        for name in GLOBAL_CGROUPS:
            if not cgroup_dirs(name) and name not in self.created_cgroups:
                self.created_cgroups.append(name)
        self.save()

    def undo(self) -> list[str]:
        """Kill this run's processes and remove what it made; what could not be removed."""
        kill_all(marked_pids(self.base))
        for cg in self.cgroups:
            kill_all(cgroup_pids(cg))
        for user in self.users:
            remove_user(user)
        left: list[str] = []
        for cg in self.cgroups + self.created_cgroups:
            left += remove_cgroups(cg, attempts=50 if cg in self.cgroups else 1)
        for s in self.sockets + shim_sockets(self.dockerds):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)
        for p in self.created:  # in GLOBAL_PATHS order: files and children before parents
            if os.path.isdir(p) and not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.rmdir(p)  # only if empty: someone else's files there stay
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        left += [p for p in self.created if os.path.lexists(p) and os.path.isdir(p) and not os.listdir(p)]
        return left


def shim_sockets(dockerds: list[str]) -> list[str]:
    """The sockets the containerd shims of these dockerds made in /run/containerd/s.

    containerd 1.6 puts them there whatever its state directory, named by the
    SHA-256 of ``<containerd address>/<namespace>/<container ID>``; a killed
    shim leaves its socket, and that directory is shared with any other
    containerd on the host, so only the names of this run's containers go.
    """
    out = []
    for d in dockerds:
        address = os.path.join(d, "exec", "containerd", "containerd.sock")
        with contextlib.suppress(FileNotFoundError):
            for cid in os.listdir(os.path.join(d, "root", "containers")):
                digest = hashlib.sha256(f"{address}/moby/{cid}".encode()).hexdigest()
                out.append(os.path.join("/run/containerd/s", digest))
    return out


def remove_user(name: str) -> None:
    """Kill a throwaway user's processes (its rootless pause process holds
    its user namespace, and userdel refuses while it lives), then delete it."""
    try:
        uid = int(run(["id", "-u", name], check=False).stdout.strip())
    except ValueError:
        return
    for _ in range(50):
        pids = user_pids(uid)
        if not pids:
            break
        kill_all(pids)
        time.sleep(0.05)
    run(["userdel", "-r", "-f", name], check=False)


def leftovers(record: Record) -> list[str]:
    """What this run left on the host, seen with our own eyes."""
    real = os.path.realpath(record.base)
    found = [f"mount {m.mount_point}" for m in MountTable.load().under(real)]
    found += [f"loop {d.path} -> {d.backing_file}" for d in loopdev.scan() if d.backing_file.startswith(real + "/")]
    found += [f"process {p}" for p in sorted(marked_pids(record.base))]
    for cg in record.cgroups + record.created_cgroups:
        found += [f"cgroup {d}" for d in cgroup_dirs(cg)]
    found += [f"socket {s}" for s in record.sockets + shim_sockets(record.dockerds) if os.path.lexists(s)]
    found += [f"created {p}" for p in record.created if os.path.lexists(p)]
    for user in record.users:
        if run(["id", "-u", user], check=False).returncode == 0:
            found.append(f"user {user}")
    return found


def reap(root: str = scratch_dirs.ROOT) -> list[str]:
    """Undo what killed engine runs left (their scratch dirs are then reaped as usual)."""
    out = []
    for base in scratch_dirs.stale(root):
        record = Record.load(base)
        if record is not None:
            left = record.undo()
            out.append(f"engine run {base}" + (f"; left: {left}" if left else ""))
    return out


# -- processes -------------------------------------------------------------------------------


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], log: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    raise AssertionError(f"nothing listens on {path} after {timeout}s:\n{_tail(log)}")


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]
    except FileNotFoundError:
        return ""


def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def spawn(argv: Sequence[str], log: str, base: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            list(argv),
            stdout=f,
            stderr=f,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": REPO, MARKER: base, **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )


class PluginProcess:
    """``elv docker-plugin`` for a test driver, under a unique plugin name."""

    def __init__(self, record: Record, endpoint: str) -> None:
        self.base = record.base
        self.name = f"elvtest-{os.getpid()}-{next(_seq)}"
        self.socket = os.path.join(PLUGIN_DIR, self.name + ".sock")
        self.endpoint = endpoint
        self.log = os.path.join(self.base, f"{self.name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        record.sockets.append(self.socket)
        record.save()

    def start(self) -> PluginProcess:
        argv = [sys.executable, "-m", "csi", "docker-plugin", "--endpoint", self.endpoint, "--socket", self.socket]
        self.proc = spawn(argv, self.log, self.base)
        wait_for_socket(self.socket, self.proc, self.log)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        rc = stop(self.proc, sig)
        self.proc = None
        return rc

    def output(self) -> str:
        return _tail(self.log, 100_000)


# -- the engines --------------------------------------------------------------------------------


class Engine:
    """What the tests ask of an engine; Docker and Podman differ only in how."""

    kind = ""

    def __init__(self, base: str, record: Record, plugin: str) -> None:
        self.base = base
        self.record = record
        self.plugin = plugin
        self.cgroup = f"elv-eng-{os.getpid()}-{next(_seq)}"
        record.cgroups.append(self.cgroup)
        record.save()

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def start(self) -> Engine:
        return self

    def close(self) -> None:
        raise NotImplementedError

    def second(self) -> Engine:
        """Another instance of the engine (its own state) using the same plugin."""
        raise NotImplementedError

    # -- shared verbs --------------------------------------------------------------------------

    def create(self, name: str, **opts: str) -> subprocess.CompletedProcess[str]:
        args = ["volume", "create", "--driver", self.plugin]
        for k, v in opts.items():
            args += ["--opt", f"{k.rstrip('_')}={v}"]
        return self.cli(*args, name, check=False)

    def run(self, volume: str, script: str, *, at: str = "/data") -> str:
        return self.cli(*self._run_args(), "--rm", "-v", f"{volume}:{at}", IMAGE, "sh", "-c", script).stdout

    def start_container(self, name: str, volume: str, at: str = "/data") -> None:
        self.cli(*self._run_args(), "-d", "--name", name, "-v", f"{volume}:{at}", IMAGE, "sleep", "600")

    def exec(self, name: str, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", name, "sh", "-c", script, check=check)

    def remove_container(self, name: str) -> None:
        raise NotImplementedError

    def _run_args(self) -> list[str]:
        return ["run", "--network", "none", "--cgroup-parent", "/" + self.cgroup]


class Docker(Engine):
    kind = "docker"

    def __init__(self, base: str, record: Record, plugin: str) -> None:
        super().__init__(base, record, plugin)
        self.dir = os.path.join(base, f"docker-{self.cgroup}")
        self.sock = os.path.join(self.dir, "docker.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(self.dir)
        record.dockerds.append(self.dir)
        record.save()

    def start(self) -> Docker:
        self.record.note_globals()
        argv = [DOCKERD, "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=vfs"]
        argv += ["--data-root", os.path.join(self.dir, "root"), "--exec-root", os.path.join(self.dir, "exec")]
        argv += ["-H", "unix://" + self.sock, "--pidfile", os.path.join(self.dir, "pid")]
        argv += ["--cgroup-parent", "/" + self.cgroup, "--userland-proxy=false"]
        self.proc = spawn(argv, os.path.join(self.dir, "dockerd.log"), self.base)
        wait_for_socket(self.sock, self.proc, os.path.join(self.dir, "dockerd.log"))
        deadline = time.monotonic() + 30
        while self.cli("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, _tail(os.path.join(self.dir, "dockerd.log"))
            time.sleep(0.05)
        self.cli("import", os.path.join(self.base, "busybox.tar"), IMAGE)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run([DOCKER, "-H", "unix://" + self.sock, *args], check=check, timeout=timeout, env=_cli_env())

    def remove_container(self, name: str) -> None:
        self.cli("rm", "-f", name)

    def second(self) -> Docker:
        return Docker(self.base, self.record, self.plugin).start()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.cli("ps", "-aq", check=False).stdout.split()
            if ids:
                self.cli("rm", "-f", *ids, check=False)
        stop(self.proc)
        self.proc = None


class Podman(Engine):
    kind = "podman"

    def __init__(self, base: str, record: Record, plugin: str, plugin_socket: str) -> None:
        super().__init__(base, record, plugin)
        self.dir = os.path.join(base, f"podman-{self.cgroup}")
        self.plugin_socket = plugin_socket
        os.makedirs(self.dir)
        self.conf = os.path.join(self.dir, "containers.conf")
        with open(self.conf, "w") as f:
            # The ulimits: root here cannot raise its hard open-files limit, and
            # Podman's default (1048576) makes every run fail (containers.md C2).
            f.write('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n')
            f.write(f'[engine.volume_plugins]\n{plugin} = "{plugin_socket}"\n')

    def start(self) -> Podman:
        self.record.note_globals()
        self.cli("import", os.path.join(self.base, "busybox.tar"), IMAGE)
        return self

    def cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        d = self.dir
        argv = [PODMAN, "--root", f"{d}/root", "--runroot", f"{d}/run", "--tmpdir", f"{d}/tmp"]
        argv += ["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]
        env = {**_cli_env(), "CONTAINERS_CONF": self.conf, MARKER: self.base}
        return run([*argv, *args], check=check, timeout=timeout, env=env)

    def remove_container(self, name: str) -> None:
        self.cli("rm", "-f", "-t", "0", name)

    def second(self) -> Podman:
        return Podman(self.base, self.record, self.plugin, self.plugin_socket).start()

    def close(self) -> None:
        ids = self.cli("ps", "-aq", check=False).stdout.split()
        if ids:
            self.cli("rm", "-f", "-t", "0", *ids, check=False)


def _cli_env() -> dict[str, str]:
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}


@contextlib.contextmanager
def engine_scratch() -> Iterator[tuple[str, Record]]:
    """A scratch dir with a busybox rootfs tarball and a record; undone at the end."""
    base = scratch_dirs.make("eng")
    record = Record(base)
    record.note_globals()  # before anything: the plugin makes /run/docker/plugins
    try:
        busybox_rootfs_tar(os.path.join(base, "busybox.tar"))
        yield base, record
    finally:
        record.undo()
        scratch_dirs.remove(base)


class RootlessPodman:
    """A throwaway user with subordinate ids, running Podman rootless with its
    store, runtime dir and config in the scratch directory. The user (and its
    pause process, which holds its user namespace) goes at teardown."""

    def __init__(self, base: str, record: Record) -> None:
        self.base = base
        self.user = f"elvrl{os.getpid()}x{next(_seq)}"
        self.dir = os.path.join(base, self.user)
        record.users.append(self.user)
        record.save()
        self.record = record
        self.uid = -1

    def start(self) -> RootlessPodman:
        self.record.note_globals()
        os.chmod(self.base, 0o711)  # the user walks to its own directory below
        run(["useradd", "--create-home", "--home-dir", os.path.join(self.dir, "home"), "--shell", "/bin/sh", self.user])
        self.uid = int(run(["id", "-u", self.user]).stdout)
        for sub in ("xdg", "store"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o700, exist_ok=True)
        shutil.copy(os.path.join(self.base, "busybox.tar"), os.path.join(self.dir, "busybox.tar"))
        with open(os.path.join(self.dir, "containers.conf"), "w") as f:
            f.write('[containers]\ndefault_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n')
        run(["chown", "-R", f"{self.user}:{self.user}", self.dir])
        self.cli("import", os.path.join(self.dir, "busybox.tar"), IMAGE)
        return self

    def subordinate(self) -> tuple[int, int]:
        """The user's /etc/subuid range: (first, count)."""
        with open("/etc/subuid") as f:
            for line in f:
                name, first, count = line.strip().split(":")
                if name == self.user:
                    return int(first), int(count)
        raise AssertionError(f"no /etc/subuid entry for {self.user}")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        d, s = self.dir, os.path.join(self.dir, "store")
        env = [
            f"XDG_RUNTIME_DIR={d}/xdg",
            f"HOME={d}/home",
            f"CONTAINERS_CONF={d}/containers.conf",
            f"{MARKER}={self.base}",
        ]
        argv = ["runuser", "-u", self.user, "--", "env", *env, PODMAN]
        argv += ["--root", f"{s}/root", "--runroot", f"{s}/run", "--tmpdir", f"{s}/tmp", "--storage-driver", "vfs"]
        return run([*argv, *args], check=check, env=_cli_env())

    def close(self) -> None:
        if self.uid >= 0:
            ids = self.cli("ps", "-aq", check=False).stdout.split()
            if ids:
                self.cli("rm", "-f", "-t", "0", *ids, check=False)
        remove_user(self.user)
