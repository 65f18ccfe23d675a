"""``elv attach`` into a real rootless Podman container: an idmapped mount from
the container's user namespace, so the container's root owns what uid 0 owns
on disk (and writes as uid 0), where a plain mount shows it all as nobody."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.driver import Driver
from tests.support.engines import MARKER, RootlessPodman, engine_scratch, leftovers
from tests.support.paths import REPO


def _idmapped(pid: int, path: str) -> bool:
    with open(f"/proc/{pid}/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == path)
    return "idmapped" in line.split()[5].split(",")


def test_attach_into_rootless_podman_is_idmapped() -> None:
    with engine_scratch() as (base, record):
        driver = Driver(base, env={MARKER: base})
        podman = RootlessPodman(base, record)

        def elv(*args: str) -> str:
            env = {**os.environ, "PYTHONPATH": REPO, "CSI_ENDPOINT": driver.endpoint}
            r = subprocess.run(
                [sys.executable, "-m", "csi", *args], capture_output=True, text=True, env=env, check=False
            )
            assert r.returncode == 0, f"elv {' '.join(args)}: {r.stdout}{r.stderr}"
            return r.stdout

        try:
            driver.start()
            podman.start()
            first, count = podman.subordinate()
            podman.cli("run", "-d", "--name", "c", "--network", "none", "localhost/elv-busybox:test", "sleep", "600")
            pid = int(podman.cli("inspect", "--format", "{{.State.Pid}}", "c").stdout)
            uid_map = [ln.split() for ln in podman.cli("exec", "c", "cat", "/proc/self/uid_map").stdout.splitlines()]
            assert uid_map == [["0", str(podman.uid), "1"], ["1", str(first), str(count)]]

            elv("volume", "create", "rl", "--size", "64Mi")
            vid = json.loads(elv("volume", "list", "--json"))[0]["id"]
            staging = driver.path("plugins", "elv.csi.dev", "attach", vid, "staging")
            assert "idmapped to its user namespace" in elv("attach", "rl", "--pid", str(pid), "--path", "/data")
            assert _idmapped(pid, "/data")
            script = "id -u; stat -c %u:%g /data; echo hi > /data/by-root; mkdir /data/d; chown 1000:1000 /data/d"
            assert podman.cli("exec", "c", "sh", "-c", script).stdout.split() == ["0", "0:0"]
            assert (os.stat(f"{staging}/by-root").st_uid, os.stat(f"{staging}/by-root").st_gid) == (0, 0)
            assert (os.stat(f"{staging}/d").st_uid, os.stat(f"{staging}/d").st_gid) == (1000, 1000)
            elv("detach", "rl", "--pid", str(pid))

            # A plain mount (--idmap none): the container's root is the user's uid on the host.
            elv("attach", "rl", "--pid", str(pid), "--path", "/data", "--idmap", "none")
            assert not _idmapped(pid, "/data")
            r = podman.cli("exec", "c", "sh", "-c", "stat -c %u:%g /data/by-root; touch /data/again", check=False)
            assert r.stdout.split() == ["65534:65534"] and r.returncode != 0, (r.stdout, r.stderr)
            elv("detach", "rl", "--pid", str(pid))

            podman.cli("rm", "-f", "-t", "0", "c")
            elv("volume", "delete", "rl")
        finally:
            podman.close()
            assert driver.stop() == 0
        record.undo()
        left = leftovers(record)
        assert left == [], left
        with open("/etc/subuid") as f:
            assert podman.user not in f.read()
