from __future__ import annotations

import json
import logging
import sys

import pytest
from google.protobuf.message import Message

from csi.server import log as elvlog
from csi.server.log import REDACTED, JsonFormatter, KeyValueFormatter, redact
from csi.v1 import csi_pb2

TOKEN_KEY = "csi.storage.k8s.io/serviceAccount.tokens"
SECRET = "hunter2-very-secret"


def _secret_fields() -> list[tuple[str, str]]:
    out = []
    for name, desc in csi_pb2.DESCRIPTOR.message_types_by_name.items():
        for f in desc.fields:
            opts = f.GetOptions()
            if opts.HasExtension(csi_pb2.csi_secret) and opts.Extensions[csi_pb2.csi_secret]:
                out.append((name, f.name))
    return out


SECRET_FIELDS = _secret_fields()


def test_the_schema_marks_the_secrets_we_expect() -> None:
    for msg in (
        "CreateVolumeRequest",
        "DeleteVolumeRequest",
        "NodeStageVolumeRequest",
        "NodePublishVolumeRequest",
        "ControllerPublishVolumeRequest",
        "ControllerExpandVolumeRequest",
        "NodeExpandVolumeRequest",
        "CreateSnapshotRequest",
    ):
        assert (msg, "secrets") in SECRET_FIELDS


@pytest.mark.parametrize(("message", "field"), SECRET_FIELDS)
def test_every_csi_secret_field_is_stripped(message: str, field: str) -> None:
    msg: Message = getattr(csi_pb2, message)()
    getattr(msg, field).update({"password": SECRET, "user": "admin-" + SECRET})
    out = redact(msg)
    text = json.dumps(out)
    assert SECRET not in text
    assert out[field] == {"password": REDACTED, "user": REDACTED}
    # The original request is untouched: redact works on a copy.
    assert getattr(msg, field)["password"] == SECRET


def test_create_volume_keeps_everything_else() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        parameters={"csi.storage.k8s.io/fstype": "xfs"},
        secrets={"key": SECRET},
    )
    out = redact(req)
    assert out["name"] == "pvc-1"
    assert out["parameters"] == {"csi.storage.k8s.io/fstype": "xfs"}
    assert out["secrets"] == {"key": REDACTED}


def test_redact_handles_nested_messages() -> None:
    # Regression: _strip() used FieldDescriptor.label, which protobuf 7 removed (AttributeError).
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="xfs"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
    )
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        secrets={"key": SECRET},
        capacity_range=csi_pb2.CapacityRange(required_bytes=1024),
        volume_capabilities=[cap],
    )
    out = redact(req)
    assert SECRET not in json.dumps(out)
    assert out["capacity_range"] == {"required_bytes": "1024"}
    assert out["volume_capabilities"][0]["mount"] == {"fs_type": "xfs"}


def test_redact_node_stage_as_kubelet_sends_it() -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id="v-loop-0",
        staging_target_path="/var/lib/kubelet/plugins/kubernetes.io/csi/elv.csi.dev/x/globalmount",
        volume_capability=csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume()),
        secrets={"a": SECRET},
        volume_context={TOKEN_KEY: SECRET},
    )
    assert SECRET not in json.dumps(redact(req))


@pytest.mark.parametrize(
    "message", ["NodePublishVolumeRequest", "NodeStageVolumeRequest", "ValidateVolumeCapabilitiesRequest"]
)
def test_service_account_tokens_in_volume_context_are_stripped(message: str) -> None:
    token = json.dumps({"audience": {"token": "eyJhbGciOi" + SECRET, "expirationTimestamp": "2030-01-01T00:00:00Z"}})
    msg: Message = getattr(csi_pb2, message)(
        volume_id="v-loop-0",
        volume_context={TOKEN_KEY: token, "csi.storage.k8s.io/pod.name": "web-0", "storage.kubernetes.io/x": "y"},
    )
    out = redact(msg)
    assert SECRET not in json.dumps(out)
    assert out["volume_context"][TOKEN_KEY] == REDACTED
    assert out["volume_context"]["csi.storage.k8s.io/pod.name"] == "web-0"
    assert out["volume_context"]["storage.kubernetes.io/x"] == "y"
    assert out["volume_id"] == "v-loop-0"


def test_node_publish_with_both_secrets_and_tokens() -> None:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="v",
        target_path="/var/lib/kubelet/pods/x/mount",
        secrets={"a": SECRET},
        volume_context={TOKEN_KEY: SECRET, "keep": "me"},
    )
    out = redact(req)
    assert SECRET not in json.dumps(out)
    assert out["target_path"] == "/var/lib/kubelet/pods/x/mount"
    assert out["volume_context"]["keep"] == "me"


def _record(msg: str, fields: dict[str, object] | None = None, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("csi.rpc", logging.INFO, __file__, 1, msg, None, exc_info)
    if fields is not None:
        rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_key_value_formatter_basic_line() -> None:
    line = KeyValueFormatter().format(_record("rpc", {"rpc": "CreateVolume", "code": "OK", "ms": 1.5}))
    assert " level=info logger=csi.rpc msg=rpc rpc=CreateVolume code=OK ms=1.5" in line
    assert line.startswith("ts=")
    assert line.split()[0].endswith("Z")


def test_key_value_formatter_cannot_be_forged_with_newlines() -> None:
    evil = "x\nts=2020-01-01T00:00:00.000Z level=error logger=csi.rpc msg=forged"
    line = KeyValueFormatter().format(_record("hello\nlevel=error", {"object": evil, "name": "a b"}))
    assert "\n" not in line
    assert "\r" not in line
    assert 'object="x\\nts=2020' in line
    assert 'name="a b"' in line
    assert 'msg="hello\\nlevel=error"' in line
    # Quotes inside values are escaped too.
    line = KeyValueFormatter().format(_record("rpc", {"error": 'say "hi" level=error'}))
    assert 'error="say \\"hi\\" level=error"' in line


def test_key_value_formatter_exception_stays_on_one_line() -> None:
    line = KeyValueFormatter().format(_record("failed", exc=True))
    assert "\n" not in line
    assert "exc=" in line
    assert "ValueError: boom" in line


def test_json_formatter_emits_valid_json() -> None:
    rec = _record('quote " and \n newline', {"rpc": "NodeStageVolume", "obj": object(), "n": 3}, exc=True)
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == 'quote " and \n newline'
    assert data["level"] == "info"
    assert data["logger"] == "csi.rpc"
    assert data["rpc"] == "NodeStageVolume"
    assert data["n"] == 3
    assert data["obj"].startswith("<object object")
    assert "ValueError: boom" in data["exc"]
    assert isinstance(data["ts"], float)


def test_setup_installs_one_handler_with_the_chosen_format() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        elvlog.setup("debug", "json")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        elvlog.setup("warning", "text")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, KeyValueFormatter)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
