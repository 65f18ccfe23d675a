"""The Kubernetes objects the drivers exchange, and the rules on them (pure).

A modify request travels on the volume's PersistentVolume:

* the sender sets the label ``elv.csi.dev/modify-node=<owner>`` (so the
  owner's driver can watch only the PVs meant for it) and the annotation
  ``elv.csi.dev/modify-request`` (JSON: id, volume, parameters, sender);
* the owner applies it and sets ``elv.csi.dev/modify-result`` (JSON: the
  request's id, a gRPC code name, a message);
* the sender, which polls the PV, takes the result of its own id and removes
  all three.

Everything read from the API is checked as hostile: a request that does not
parse, names another volume than the PV's, or carries non-string parameters
is answered INVALID_ARGUMENT and never applied.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csi.errors import (
    Aborted,
    AlreadyExists,
    ElvError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

REQUEST = "elv.csi.dev/modify-request"
RESULT = "elv.csi.dev/modify-result"
NODE_LABEL = "elv.csi.dev/modify-node"
MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
#: A request's JSON is refused beyond this (annotations may hold 256 KiB in all).
MAX_REQUEST = 8192

_LABEL_VALUE = re.compile(r"\A[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_ERRORS: dict[str, type[ElvError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
    "OUT_OF_RANGE": OutOfRange,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "ABORTED": Aborted,
    "UNAVAILABLE": Unavailable,
    "UNIMPLEMENTED": Unimplemented,
}


def label_value(node: str) -> str:
    """A node name as a label value: itself when it is a valid one (63
    characters at most), else a digest of it (node names may be 253 long)."""
    if _LABEL_VALUE.match(node):
        return node
    return "h-" + hashlib.sha256(node.encode()).hexdigest()[:40]


def code_name(e: BaseException) -> str:
    return e.code.name if isinstance(e, ElvError) else "INTERNAL"


def error_for(code: str, message: str) -> ElvError:
    """The driver's error for a gRPC code name read from a result."""
    return _ERRORS.get(code, Internal)(message)


@dataclass(frozen=True)
class ModifyRequest:
    id: str
    volume_id: str
    parameters: dict[str, str]
    sender: str

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.id, "volume": self.volume_id, "parameters": self.parameters, "sender": self.sender},
            sort_keys=True,
        )

    @classmethod
    def parse(cls, text: str) -> ModifyRequest:
        """InvalidArgument unless ``text`` is a well-formed request."""
        if len(text) > MAX_REQUEST:
            raise InvalidArgument("the modify request is too large")
        try:
            d = json.loads(text)
        except ValueError:
            raise InvalidArgument("the modify request is not JSON") from None
        if not isinstance(d, dict):
            raise InvalidArgument("the modify request is not an object")
        fields = [d.get(k) for k in ("id", "volume", "sender")]
        params = d.get("parameters")
        if not all(isinstance(x, str) and x for x in fields) or not isinstance(params, dict):
            raise InvalidArgument("the modify request lacks its id, volume, sender or parameters")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()):
            raise InvalidArgument("the modify request's parameters are not strings")
        return cls(str(d["id"]), str(d["volume"]), dict(params), str(d["sender"]))


@dataclass(frozen=True)
class ModifyResult:
    id: str
    code: str
    message: str = ""

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "code": self.code, "message": self.message[:1000]}, sort_keys=True)

    @classmethod
    def parse(cls, text: str | None) -> ModifyResult | None:
        """None for anything that is not a result."""
        try:
            d = json.loads(text or "")
        except ValueError:
            return None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("id", "code")):
            return None
        return cls(d["id"], d["code"], str(d.get("message", "")))


# -- PersistentVolumes


def pv_handle(pv: Mapping[str, Any], driver: str) -> str:
    """The volume ID of a PV of ``driver`` ("" for another driver's)."""
    csi = (pv.get("spec") or {}).get("csi") or {}
    return str(csi.get("volumeHandle") or "") if csi.get("driver") == driver else ""


def pv_owner(pv: Mapping[str, Any], driver: str) -> str:
    """The node a PV's node affinity pins it to (the driver's topology key)."""
    key = f"topology.{driver}/node"
    terms = (((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms") or []
    for term in terms:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == key and expr.get("operator") == "In" and len(expr.get("values") or []) == 1:
                return str(expr["values"][0])
    return ""


def annotations_of(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("annotations") or {})


def pending_request(pv: Mapping[str, Any], driver: str) -> tuple[ModifyRequest | None, str]:
    """What the owner must do with a PV: (the request to apply, "") or
    (None, why not): nothing asked, already answered, or a bad request (the
    why then starts with "invalid:" and is the answer to give)."""
    ann = annotations_of(pv)
    text = ann.get(REQUEST)
    if not text:
        return None, "no request"
    try:
        req = ModifyRequest.parse(text)
    except InvalidArgument as e:
        return None, f"invalid: {e.message}"
    done = ModifyResult.parse(ann.get(RESULT))
    if done is not None and done.id == req.id:
        return None, "answered"
    if req.volume_id != pv_handle(pv, driver):
        return None, "invalid: the request names another volume than this PersistentVolume's"
    return req, ""


def request_patch(req: ModifyRequest, owner: str) -> dict[str, Any]:
    return {
        "metadata": {
            "labels": {NODE_LABEL: label_value(owner)},
            "annotations": {REQUEST: req.to_json(), RESULT: None},
        }
    }


def result_patch(result: ModifyResult) -> dict[str, Any]:
    return {"metadata": {"annotations": {RESULT: result.to_json()}}}


def clear_patch() -> dict[str, Any]:
    return {"metadata": {"labels": {NODE_LABEL: None}, "annotations": {REQUEST: None, RESULT: None}}}


# -- snapshot contents


def group_class_name(node: str) -> str:
    name = f"elv-group-snapshots-{node}"
    return name if len(name) <= 253 else "elv-group-snapshots-" + hashlib.sha256(node.encode()).hexdigest()[:40]


def group_class(node: str, node_uid: str, driver: str) -> dict[str, Any]:
    """This node's VolumeGroupSnapshotClass: the one its csi-snapshotter sees
    (the label), owned by the Node, so it goes when the Node does."""
    return {
        "apiVersion": "groupsnapshot.storage.k8s.io/v1",
        "kind": "VolumeGroupSnapshotClass",
        "metadata": {
            "name": group_class_name(node),
            "labels": {MANAGED_BY: node, "app.kubernetes.io/part-of": "elv"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid}],
        },
        "driver": driver,
        "deletionPolicy": "Delete",
    }


def content_handles(content: Mapping[str, Any], driver: str) -> list[tuple[str, str]]:
    """What a snapshot content (single or group) is made of, as (kind, ID):
    "volume" for the volumes it is (to be) taken of, "snapshot"/"group" for a
    pre-provisioned one. Empty for another driver's or an unknown shape."""
    spec = content.get("spec") or {}
    if spec.get("driver") != driver:
        return []
    src = spec.get("source") or {}
    out: list[tuple[str, str]] = []
    if isinstance(src.get("volumeHandle"), str):
        out.append(("volume", src["volumeHandle"]))
    elif isinstance(src.get("snapshotHandle"), str):
        out.append(("snapshot", src["snapshotHandle"]))
    for h in src.get("volumeHandles") or []:
        out.append(("volume", str(h)))
    group = (src.get("groupSnapshotHandles") or {}).get("volumeGroupSnapshotHandle")
    if isinstance(group, str):
        out.append(("group", group))
    return out


def needs_label(content: Mapping[str, Any]) -> bool:
    return MANAGED_BY not in ((content.get("metadata") or {}).get("labels") or {})


def label_patch(node: str) -> dict[str, Any]:
    return {"metadata": {"labels": {MANAGED_BY: node}}}
