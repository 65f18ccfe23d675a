"""The driver state machine: random RPC sequences, restarts and retries
checked against a model (hypothesis.stateful). tests/reliability runs it on
the loop backend, tests/lvm subclasses it for LVM.
"""

from __future__ import annotations

import os
import subprocess

import grpc
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from csi.host import scratch
from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB, leftovers
from tests.support.rpc import code_of, mount_cap


def code_and_id(d: Driver, req: csi_pb2.CreateVolumeRequest) -> tuple[grpc.StatusCode, str]:
    try:
        return grpc.StatusCode.OK, d.controller.CreateVolume(req).volume.volume_id
    except grpc.RpcError as e:
        return e.code(), ""


NAMES = st.sampled_from(["alpha", "beta", "gamma", "delta"])


class DriverMachine(RuleBasedStateMachine):
    """Model: name -> state ('created' | 'staged' | 'published'). The real driver
    must agree after every step, across restarts and repeated calls."""

    def __init__(self) -> None:
        super().__init__()
        self.base = scratch.make("sm")
        self.d = self.start_driver()
        self.model: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        self.make_foreign()

    # -- what a backend's machine changes (tests/lvm/test_lvm_state_machine.py) --

    def start_driver(self) -> Driver:
        return Driver(self.base).start()

    def parameters(self, name: str) -> dict[str, str]:
        return {}

    def make_foreign(self) -> None:
        """Something foreign that must never be touched: a loop device and a file in the pool."""
        self.foreign_img = os.path.join(self.base, "foreign.img")
        with open(self.foreign_img, "wb") as f:
            f.truncate(8 * MiB)
        self.foreign_loop = subprocess.run(
            ["losetup", "-f", "--show", self.foreign_img], check=True, capture_output=True, text=True
        ).stdout.strip()
        with open(os.path.join(self.d.pool, "volumes", "README.txt"), "w") as f:
            f.write("not ours")

    def foreign_intact(self) -> None:
        assert os.path.exists(self.foreign_loop) and any(
            x.path == self.foreign_loop and x.backing_file == os.path.realpath(self.foreign_img)
            for x in observe.loops()
        ), "a foreign loop device was touched"
        assert os.path.exists(os.path.join(self.d.pool, "volumes", "README.txt")), "a foreign file was touched"

    def remove_foreign(self) -> None:
        subprocess.run(["losetup", "-d", self.foreign_loop], check=True)

    def is_staged(self, name: str) -> bool:
        """A filesystem stage is a mount at the staging path; a raw block stage
        a bind of the device node onto a file in it (csi.node.mounts.STAGED)."""
        return observe.mounts_under(self.staging(name)) != []

    def staging(self, name: str) -> str:
        return self.d.path("st", name)

    def target(self, name: str) -> str:
        return self.d.path("pods", name, "t")

    def ok(self, fn: object, *args: object) -> None:
        code = code_of(fn, *args)
        assert code == grpc.StatusCode.OK, f"{code}\n{self.d.log()[-2000:]}"

    @rule(name=NAMES, size=st.sampled_from([32, 48]))
    def create(self, name: str, size: int) -> None:
        req = csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_cap()],
            capacity_range=csi_pb2.CapacityRange(required_bytes=size * MiB),
            parameters=self.parameters(name),
        )
        code, vid = code_and_id(self.d, req)
        if name in self.model:
            # Same name: same volume, or ALREADY_EXISTS if it is smaller than asked.
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.ALREADY_EXISTS)
            if code == grpc.StatusCode.OK:
                assert vid == self.ids[name]
        else:
            assert code == grpc.StatusCode.OK
            self.model[name] = "created"
            self.ids[name] = vid

    @precondition(lambda self: any(s == "created" for s in self.model.values()))
    @rule(data=st.data())
    def stage(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.model.items() if s == "created")))
        os.makedirs(self.staging(name), exist_ok=True)
        for _ in range(data.draw(st.integers(1, 2))):  # repeats are no-ops
            self.ok(self.d.stage, self.ids[name], self.staging(name))
        self.model[name] = "staged"

    @precondition(lambda self: any(s == "staged" for s in self.model.values()))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.model.items() if s == "staged")))
        os.makedirs(os.path.dirname(self.target(name)), exist_ok=True)
        self.ok(self.d.publish, self.ids[name], self.staging(name), self.target(name))
        self.model[name] = "published"

    @precondition(lambda self: any(s == "published" for s in self.model.values()))
    @rule(data=st.data())
    def unpublish(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.model.items() if s == "published")))
        for _ in range(data.draw(st.integers(1, 2))):
            self.ok(self.d.unpublish, self.ids[name], self.target(name))
        self.model[name] = "staged"

    @precondition(lambda self: any(s == "staged" for s in self.model.values()))
    @rule(data=st.data())
    def unstage(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, s in self.model.items() if s == "staged")))
        for _ in range(data.draw(st.integers(1, 2))):
            self.ok(self.d.unstage, self.ids[name], self.staging(name))
        self.model[name] = "created"

    @rule(name=NAMES)
    def delete(self, name: str) -> None:
        if name not in self.model:
            self.ok(self.d.delete, "v-loop-" + "0" * 32)
            return
        code = code_of(self.d.delete, self.ids[name])
        if self.model[name] == "created":
            assert code == grpc.StatusCode.OK
            del self.model[name]
        else:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, "an in-use volume must not be deleted"

    @rule(hard=st.booleans())
    def restart(self, hard: bool) -> None:
        if hard:
            self.d.kill()
            self.d.start()
        else:
            self.d.restart()

    @invariant()
    def agrees_with_model(self) -> None:
        listed = sorted(e.volume.volume_id for e in self.d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries)
        assert listed == sorted(self.ids[n] for n in self.model), "one volume per name, none lost or leaked"
        for name, state in self.model.items():
            staged = self.is_staged(name)
            published = observe.top(self.target(name)) is not None
            assert staged == (state in ("staged", "published")), (name, state)
            assert published == (state == "published"), (name, state)
        self.foreign_intact()

    def teardown(self) -> None:
        try:
            for name, state in list(self.model.items()):
                if state == "published":
                    self.ok(self.d.unpublish, self.ids[name], self.target(name))
                if state in ("staged", "published"):
                    self.ok(self.d.unstage, self.ids[name], self.staging(name))
                self.ok(self.d.delete, self.ids[name])
            self.remove_foreign()
            assert leftovers(self.base) == []
        finally:
            self.d.stop()
            scratch.remove(self.base)


def run_machine(machine: type[DriverMachine], examples: int, steps: int) -> None:
    machine_settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    run_state_machine_as_test(machine, settings=machine_settings)
