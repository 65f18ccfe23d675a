from __future__ import annotations

import ast
import inspect

import grpc
import pytest

from csi import errors
from csi.errors import (
    Aborted,
    AlreadyExists,
    CommandError,
    CommandTimeout,
    CorruptState,
    ElvError,
    FailedPrecondition,
    Internal,
    InUse,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)

S = grpc.StatusCode


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (ElvError, S.INTERNAL),
        (InvalidArgument, S.INVALID_ARGUMENT),
        (NotFound, S.NOT_FOUND),
        (AlreadyExists, S.ALREADY_EXISTS),
        (FailedPrecondition, S.FAILED_PRECONDITION),
        (InUse, S.FAILED_PRECONDITION),
        (OutOfRange, S.OUT_OF_RANGE),
        (ResourceExhausted, S.RESOURCE_EXHAUSTED),
        (Aborted, S.ABORTED),
        (Unavailable, S.UNAVAILABLE),
        (Unimplemented, S.UNIMPLEMENTED),
        (Internal, S.INTERNAL),
        (CorruptState, S.INTERNAL),
    ],
)
def test_each_class_has_its_grpc_code(cls: type[ElvError], code: grpc.StatusCode) -> None:
    e = cls("what went wrong")
    assert e.code == code
    assert e.message == "what went wrong"
    assert str(e) == "what went wrong"
    assert isinstance(e, ElvError)


def test_command_errors_are_internal_and_in_the_tree() -> None:
    e = CommandError(["mkfs.ext4", "/dev/loop3"], 1)
    t = CommandTimeout(["mkfs.ext4", "/dev/loop3"], 5)
    assert e.code == S.INTERNAL
    # A timeout may still be in progress underneath: callers retry DEADLINE_EXCEEDED.
    assert t.code == S.DEADLINE_EXCEEDED
    assert isinstance(e, Internal)
    assert isinstance(t, CommandError)
    assert issubclass(InUse, FailedPrecondition)
    assert issubclass(CorruptState, Internal)


def test_command_error_keeps_everything_but_says_little() -> None:
    stderr = (
        b"".join(f"noise line {i}\n".encode() for i in range(200)) + b"mkfs.ext4: Device size reported to be zero\n\n"
    )
    e = CommandError(["mkfs.ext4", "-q", "--", "/dev/loop3"], 1, b"out", stderr)
    assert e.argv == ("mkfs.ext4", "-q", "--", "/dev/loop3")
    assert e.returncode == 1
    assert e.stdout == b"out"
    assert e.stderr == stderr
    assert str(e) == "mkfs.ext4 exited with status 1: mkfs.ext4: Device size reported to be zero"
    assert e.message == str(e)
    assert "noise" not in str(e)


def test_command_error_message_is_bounded() -> None:
    e = CommandError(["tool"], 2, b"", b"x" * 10_000)
    assert len(str(e)) < 400
    assert str(e).startswith("tool exited with status 2: xxx")


def test_command_error_falls_back_to_stdout_and_then_to_nothing() -> None:
    assert str(CommandError(["lvs"], 5, b"first\nlast words\n", b"")) == "lvs exited with status 5: last words"
    assert str(CommandError(["lvs"], 5)) == "lvs exited with status 5"
    assert str(CommandError([], 5)) == "? exited with status 5"


def test_command_error_decodes_invalid_utf8() -> None:
    e = CommandError(["blkid"], 4, b"", b"bad \xff\xfe bytes")
    assert "bad" in str(e)
    assert "\ufffd" in str(e)


def test_command_timeout_message() -> None:
    t = CommandTimeout(["losetup", "--find"], 2.5)
    assert t.timeout == 2.5
    assert t.returncode == -9
    assert t.argv == ("losetup", "--find")
    assert str(t) == "losetup did not finish within 2.5s and was killed"
    assert t.message == str(t)
    assert t.args == (t.message,)


def test_errors_module_imports_nothing_from_csi() -> None:
    tree = ast.parse(inspect.getsource(errors))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in csi.errors"
            imported.append(node.module or "")
    assert imported, "the AST walk found no imports at all"
    assert not [m for m in imported if m == "csi" or m.startswith("csi.")]
