"""Logging: key=value or JSON lines on stderr, and redaction of requests.

Secrets must never reach a log line, at any level. The spec marks secret
fields with the ``csi_secret`` option; those are blanked recursively. Kubelet
also passes service-account tokens in ``volume_context`` under a key that is
*not* marked (CVE-2023-2878, CVE-2024-3744), so that key is blanked by name.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from csi.v1 import csi_pb2

REDACTED = "***stripped***"
#: volume_context keys that carry credentials without being marked csi_secret.
SECRET_CONTEXT_KEYS = frozenset({"csi.storage.k8s.io/serviceAccount.tokens"})


def _is_secret(field: FieldDescriptor) -> bool:
    opts = field.GetOptions()
    return bool(opts.HasExtension(csi_pb2.csi_secret) and opts.Extensions[csi_pb2.csi_secret])


def redact(msg: Message) -> dict[str, Any]:
    """A loggable dict of a request with every secret removed."""
    copy = msg.__class__()
    copy.CopyFrom(msg)
    _strip(copy)
    out: dict[str, Any] = json_format.MessageToDict(copy, preserving_proto_field_name=True)
    return out


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _blank(m: Any, keys: Iterable[str]) -> None:
    for k in list(keys):
        m[k] = REDACTED


def _strip(msg: Message) -> None:
    for field, value in msg.ListFields():
        if _is_secret(field):
            if _is_map(field):
                m = getattr(msg, field.name)
                _blank(m, m)
            else:
                msg.ClearField(field.name)
        elif field.name == "volume_context" and _is_map(field):
            ctx = getattr(msg, field.name)
            _blank(ctx, [k for k in ctx if k in SECRET_CONTEXT_KEYS])
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            for item in value if field.is_repeated else [value]:
                _strip(item)


def _quote(v: object) -> str:
    s = str(v)
    if s and all(c.isalnum() or c in "-_./:@+" for c in s):
        return s
    return json.dumps(s)  # quotes, and escapes newlines so a value can't forge a log line


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={ts}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        fields: Mapping[str, object] = getattr(record, "fields", {}) or {}
        parts += [f"{k}={_quote(v)}" for k, v in fields.items()]
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
