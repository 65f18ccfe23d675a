"""The fuzzing of every RPC: requests generated from the message descriptors
(so a new field is fuzzed without touching a test), hostile strings, and the
two properties each call must keep (never INTERNAL or UNKNOWN; a rejected
call changes nothing). tests/reliability and tests/lvm fuzz their driver with it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csi.v1 import csi_pb2
from tests.support import observe
from tests.support.driver import Driver, MiB

SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [m.name for m in csi_pb2.DESCRIPTOR.services_by_name["Controller"].methods],
    "GroupController": [m.name for m in csi_pb2.DESCRIPTOR.services_by_name["GroupController"].methods],
    "Node": [m.name for m in csi_pb2.DESCRIPTOR.services_by_name["Node"].methods],
}
CALLS = [(svc, m) for svc, methods in SERVICES.items() for m in methods]


def hostile_strings(d: Driver, known: list[str]) -> st.SearchStrategy[str]:
    k = d.kubelet
    fixed = [
        "",
        " ",
        "../../etc",
        "/etc/passwd",
        "/",
        "//",
        "relative",
        "-rf",
        "a" * 129,
        "é" * 65,
        "\x00",
        "\n",
        "x,y=z",
        "noatime,dev=/dev/sda",
        "v-loop-" + "0" * 32,
        "s-loop-" + "f" * 32,
        "g-loop-" + "1" * 32,
        "v-loop-../x",
        k,
        k + "/",
        k + "/st",
        k + "/st/../..",
        k + "/t/x",
        k + "/st",
        "/proc/self/root",
        "ext4",
        "xfs",
        "btrfs",
        "thick",
        "thin",
        "elv.csi.dev/provisioning",
        "csi.storage.k8s.io/fstype",
        "node-a",
        "other-node",
    ]
    return st.one_of(st.sampled_from(fixed + known), st.text(max_size=40), st.text(min_size=120, max_size=140))


INTS = st.sampled_from([0, 1, -1, 4096, MiB, 64 * MiB, 2**31 - 1, 2**40, 2**62, -(2**62)])


def message(desc: Descriptor, strings: st.SearchStrategy[str], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values for ``desc`` (built into a message later)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        fields[f.name] = field_values(f, strings, depth)
    if not fields:
        return st.just({})
    return st.fixed_dictionaries({}, optional=fields)


def field_values(f: FieldDescriptor, strings: st.SearchStrategy[str], depth: int) -> st.SearchStrategy[Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        return st.dictionaries(strings, strings, max_size=3)
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if depth > 3 or f.message_type.full_name.startswith("google.protobuf.Timestamp"):
            one: st.SearchStrategy[Any] = st.just({})
        else:
            one = message(f.message_type, strings, depth + 1)
    elif f.type == FieldDescriptor.TYPE_STRING:
        one = strings
    elif f.type == FieldDescriptor.TYPE_BOOL:
        one = st.booleans()
    elif f.type == FieldDescriptor.TYPE_ENUM:
        one = st.sampled_from([v.number for v in f.enum_type.values] + [99, -5])
    elif f.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_INT32):
        one = INTS if f.type == FieldDescriptor.TYPE_INT64 else st.sampled_from([0, 1, -1, 2, 2**31 - 1])
    else:
        one = st.just(None)
    return st.lists(one, max_size=3) if f.is_repeated else one


def build(desc: Descriptor, values: dict[str, Any]) -> Message:
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(desc)()
    fill(msg, values)
    return msg


def fill(msg: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        if value is None:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            getattr(msg, name).update(value)
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.is_repeated:
                for v in value:
                    fill(getattr(msg, name).add(), v)
            else:
                getattr(msg, name).SetInParent()
                fill(getattr(msg, name), value)
        elif f.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)


def state(d: Driver) -> tuple[object, ...]:
    files = sorted(
        (sub, n, os.stat(os.path.join(d.pool, sub, n)).st_size)
        for sub in ("volumes", "snapshots", "groups", "tmp")
        for n in os.listdir(os.path.join(d.pool, sub))
    )
    return (files, mounts_and_loops(d))


def mounts_and_loops(d: Driver) -> tuple[object, ...]:
    mounts = sorted((m.mount_point, m.readonly) for m in observe.mounts_under(d.base))
    loops = sorted(x.backing_file for x in observe.loops_under(d.base))
    return (mounts, loops)


@dataclass
class Fuzzed:
    """A driver under fuzz: IDs that exist (so valid-looking IDs hit
    something real), how to read its state, and how many examples per RPC."""

    d: Driver
    known: list[str]
    state: Callable[[], object]
    examples: int
    calls: int = 0
    codes: Counter[str] = field(default_factory=Counter)

    def summary(self, label: str, out: str) -> str:
        """One line of figures, also written to ci-out/OUT for scripts/test to print."""
        codes = " ".join(f"{k}={v}" for k, v in sorted(self.codes.items()))
        line = f"{label}: examples={self.examples}/RPC calls={self.calls} {codes}"
        os.makedirs("ci-out", exist_ok=True)
        with open(os.path.join("ci-out", out), "w") as f:
            f.write(line + "\n")
        return line


def undo(d: Driver, seeded: str) -> None:
    """Remove through CSI what the seed and the fuzzer's accepted calls made:
    publishes of the seed (a fuzzed NodePublishVolume may be valid), its
    stage, every snapshot and every volume."""
    staging = os.path.realpath(d.path("st"))
    for m in sorted(observe.mounts_under(d.kubelet), key=lambda m: -len(m.mount_point)):
        if m.mount_point != staging:
            d.unpublish(seeded, m.mount_point)
    d.unstage(seeded, d.path("st"))
    for e in d.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
        d.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=e.snapshot.snapshot_id))
    for v in d.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries:
        d.delete(v.volume.volume_id)


def seed(d: Driver, **params: str) -> list[str]:
    """Something real for valid IDs to hit: a staged volume and a snapshot of it."""
    vid = d.create("fuzz-seed", 32 * MiB, parameters=params)
    os.makedirs(d.path("st"), exist_ok=True)
    d.stage(vid, d.path("st"))
    sid = d.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="fuzz-snap", source_volume_id=vid)
    ).snapshot.snapshot_id
    return [vid, sid]


def fuzz_rpc(fz: Fuzzed, service: str, method: str) -> None:
    d = fz.d
    sdesc = csi_pb2.DESCRIPTOR.services_by_name[service]
    mdesc = sdesc.methods_by_name[method]
    if mdesc.server_streaming:
        pytest.fail("streaming methods are not served")
    stub = {"Identity": d.identity, "Controller": d.controller, "GroupController": d.group, "Node": d.node}[service]
    call = getattr(stub, method)
    # The state after one call is the state before the next: nothing else
    # changes it. A fuzzed call can only name the seeded volume (staged, so
    # never deleted) and snapshot (on a backend or class whose deletes finish
    # before the answer: nothing is wiped behind our back). Reading it once a
    # call halves the cost on LVM.
    last = [fz.state()]

    @settings(max_examples=fz.examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(values=message(mdesc.input_type, hostile_strings(d, fz.known)))
    def one(values: dict[str, Any]) -> None:
        req = build(mdesc.input_type, values)
        before = last[0]
        fz.calls += 1
        try:
            call(req, timeout=30)
            fz.codes["OK"] += 1
            last[0] = fz.state()  # an accepted call may change it
            return
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        fz.codes[code.name] += 1
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
            f"{method} -> {code.name}: {details}\n{req}"
        )
        after = fz.state()
        assert after == before, f"rejected {method} ({code.name}: {details}) changed state\n{req}"
        last[0] = after

    one()
    # The driver survived: it still answers.
    assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value
