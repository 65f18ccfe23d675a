"""ELV's proto/csi/v1/csi.proto must describe exactly the official CSI v1.12.0 schema.

The official csi.proto is fetched with the Go toolchain (into the Go module
cache, never into this repository), compiled to a FileDescriptorSet in a
temporary directory, and compared with the descriptor embedded in our
generated csi/v1/csi_pb2.py. Comments, file name, source info and json_name
are ignored; everything else (names, numbers, types, labels, oneofs, nesting,
options and custom extensions) must match, down to the serialized bytes.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, text_format

from csi.v1 import csi_pb2  # also registers csi.v1 option extensions for printing

SPEC_MODULE = "github.com/container-storage-interface/spec"
SPEC_VERSION = "v1.12.0"

FDP = descriptor_pb2.FieldDescriptorProto


# ---------------------------------------------------------------- fetching


def _download_spec(workdir: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail(
            "the Go toolchain (`go`) is not on PATH; it is required to fetch the official "
            f"CSI schema ({SPEC_MODULE}@{SPEC_VERSION}) for this conformance test"
        )
    env = dict(os.environ, GOFLAGS="-mod=mod", GOWORK="off", GO111MODULE="on")
    try:
        proc = subprocess.run(
            [go, "mod", "download", "-json", f"{SPEC_MODULE}@{SPEC_VERSION}"],
            check=False,
            cwd=workdir,  # empty directory: no go.mod, no workspace
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`go mod download {SPEC_MODULE}@{SPEC_VERSION}` timed out")
    info: dict[str, Any] = {}
    if proc.stdout.strip():
        info = json.loads(proc.stdout)
    if proc.returncode != 0 or info.get("Error") or not info.get("Dir"):
        pytest.fail(
            f"`go mod download` of {SPEC_MODULE}@{SPEC_VERSION} failed "
            f"(rc={proc.returncode}): {info.get('Error') or proc.stderr.strip()}"
        )
    spec_dir = Path(info["Dir"])
    assert (spec_dir / "csi.proto").is_file(), f"no csi.proto in {spec_dir}"
    return spec_dir


def _compile_official(spec_dir: Path, workdir: Path) -> descriptor_pb2.FileDescriptorProto:
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out = workdir / "official.pb"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{spec_dir}",
            f"-I{well_known}",
            f"--descriptor_set_out={out}",
            str(spec_dir / "csi.proto"),
        ],
        check=False,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"protoc failed on the official csi.proto:\n{proc.stderr}"
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1, [f.name for f in fds.file]
    return fds.file[0]


# ----------------------------------------------------------- normalising


def _clear_json_names(msg: descriptor_pb2.DescriptorProto) -> None:
    for f in list(msg.field) + list(msg.extension):
        f.ClearField("json_name")
    for nested in msg.nested_type:
        _clear_json_names(nested)


def _sort_by_name(repeated: Any) -> None:
    copies = []
    for x in sorted(repeated, key=lambda x: x.name):
        c = type(x)()
        c.CopyFrom(x)
        copies.append(c)
    del repeated[:]
    repeated.extend(copies)


def normalise(
    fdp: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """Drop what legitimately differs (file name, comments, json_name, top-level order)."""
    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(fdp)
    out.ClearField("name")
    out.ClearField("source_code_info")
    for f in out.extension:
        f.ClearField("json_name")
    for m in out.message_type:
        _clear_json_names(m)
    _sort_by_name(out.message_type)
    _sort_by_name(out.enum_type)
    _sort_by_name(out.service)
    _sort_by_name(out.extension)
    deps = sorted(out.dependency)
    del out.dependency[:]
    out.dependency.extend(deps)
    return out


# ------------------------------------------------------------ comparing


def _opts(owner: Any) -> str | None:
    """An element's options as text; None when absent (presence is part of the wire form)."""
    if not owner.HasField("options"):
        return None
    return "{" + text_format.MessageToString(owner.options, as_one_line=True, print_unknown_fields=True) + "}"


def _field_view(f: FDP, owner: descriptor_pb2.DescriptorProto | None) -> dict[str, Any]:
    return {
        "number": f.number,
        "type": FDP.Type.Name(f.type),
        "type_name": f.type_name,
        "label": FDP.Label.Name(f.label),
        "oneof": owner.oneof_decl[f.oneof_index].name if owner is not None and f.HasField("oneof_index") else None,
        "proto3_optional": f.proto3_optional,
        "extendee": f.extendee,
        "default_value": f.default_value,
        "options": _opts(f),
    }


def _enum_view(e: descriptor_pb2.EnumDescriptorProto) -> dict[str, Any]:
    return {
        "options": _opts(e),
        "values": {v.name: {"number": v.number, "options": _opts(v)} for v in e.value},
        "value_order": [v.name for v in e.value],
        "reserved": [(r.start, r.end) for r in e.reserved_range] + list(e.reserved_name),
    }


def _message_view(m: descriptor_pb2.DescriptorProto) -> dict[str, Any]:
    return {
        "options": _opts(m),
        "fields": {f.name: _field_view(f, m) for f in m.field},
        "field_order": [f.name for f in m.field],
        "oneofs": [(o.name, _opts(o)) for o in m.oneof_decl],
        "messages": {n.name: _message_view(n) for n in m.nested_type},
        "message_order": [n.name for n in m.nested_type],
        "enums": {e.name: _enum_view(e) for e in m.enum_type},
        "enum_order": [e.name for e in m.enum_type],
        "extensions": {x.name: _field_view(x, None) for x in m.extension},
        "extension_ranges": [(r.start, r.end) for r in m.extension_range],
        "reserved": [(r.start, r.end) for r in m.reserved_range] + list(m.reserved_name),
    }


def _service_view(s: descriptor_pb2.ServiceDescriptorProto) -> dict[str, Any]:
    return {
        "options": _opts(s),
        "methods": {
            m.name: {
                "input_type": m.input_type,
                "output_type": m.output_type,
                "client_streaming": m.client_streaming,
                "server_streaming": m.server_streaming,
                "options": _opts(m),
            }
            for m in s.method
        },
        "method_order": [m.name for m in s.method],
    }


def file_view(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, Any]:
    return {
        "package": fdp.package,
        "syntax": fdp.syntax,
        "edition": fdp.edition,
        "dependencies": sorted(set(fdp.dependency)),
        "public_dependencies": sorted(fdp.public_dependency),
        "options": _opts(fdp),
        "messages": {m.name: _message_view(m) for m in fdp.message_type},
        "enums": {e.name: _enum_view(e) for e in fdp.enum_type},
        "services": {s.name: _service_view(s) for s in fdp.service},
        "extensions": {x.name: _field_view(x, None) for x in fdp.extension},
    }


def diff(ours: Any, official: Any, path: str = "csi.v1") -> list[str]:
    """Readable, recursive differences between two views ('ours' vs 'official')."""
    if isinstance(ours, dict) and isinstance(official, dict):
        problems = []
        for key in sorted(set(ours) | set(official), key=str):
            where = f"{path}.{key}"
            if key not in official:
                problems.append(f"{where}: present in ours, absent from the official schema")
            elif key not in ours:
                problems.append(f"{where}: missing from ours")
            else:
                problems.extend(diff(ours[key], official[key], where))
        return problems
    if ours != official:
        return [f"{path}: ours={ours!r} official={official!r}"]
    return []


def compare(
    ours: descriptor_pb2.FileDescriptorProto,
    official: descriptor_pb2.FileDescriptorProto,
) -> list[str]:
    """All differences after normalisation; empty means identical, byte for byte."""
    a, b = normalise(ours), normalise(official)
    problems = diff(file_view(a), file_view(b))
    if not problems and a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
        problems.append(
            "normalised descriptors differ on the wire although every compared "
            "attribute matches; a descriptor attribute is not covered by file_view()"
        )
    return problems


# ------------------------------------------------------------------ tests


def _ours() -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(csi_pb2.DESCRIPTOR.serialized_pb)


@functools.cache
def _official() -> descriptor_pb2.FileDescriptorProto:
    """Fetch and compile the official schema once per session (in the test body, so
    that a missing Go toolchain is a test failure rather than a setup error)."""
    with tempfile.TemporaryDirectory(prefix="csi-spec-") as tmp:
        workdir = Path(tmp)
        return _compile_official(_download_spec(workdir), workdir)


@pytest.mark.timeout(300)
def test_descriptor_matches_official_spec() -> None:
    official = _official()
    ours = _ours()
    problems = compare(ours, official)
    assert not problems, "csi.proto deviates from CSI {}:\n  {}".format(SPEC_VERSION, "\n  ".join(problems))
    # Wire identity of the normalised descriptors.
    assert normalise(ours).SerializeToString(deterministic=True) == normalise(official).SerializeToString(
        deterministic=True
    )


@pytest.mark.timeout(300)
def test_comparison_detects_a_changed_field_number() -> None:
    """Guard against a vacuous comparison: a one-number change must be reported."""
    official = _official()
    tampered = _ours()
    msg = next(m for m in tampered.message_type if m.name == "CreateVolumeRequest")
    field = next(f for f in msg.field if f.name == "secrets")
    field.number = 55
    problems = compare(tampered, official)
    assert "csi.v1.messages.CreateVolumeRequest.fields.secrets.number: ours=55 official=5" in problems, problems
