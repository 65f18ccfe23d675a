"""The driver's error tree. Every failure a caller can see is one of these.

Each class carries the gRPC status code it becomes; the server's interceptor
(csi.server.interceptor) is the only place that turns them into gRPC statuses.
Anything that is not an ElvError becomes INTERNAL there, with its traceback
logged, so a client never sees UNKNOWN.

    ElvError                      INTERNAL
    ├── InvalidArgument           INVALID_ARGUMENT  a request field is missing or malformed
    │   └── UnknownClass                            parameters name a class this node does not have
    ├── NotFound                  NOT_FOUND         the volume, snapshot or path does not exist
    ├── AlreadyExists             ALREADY_EXISTS    same name or path, incompatible request
    ├── FailedPrecondition        FAILED_PRECONDITION  the state does not allow it yet
    │   └── InUse                                   staged, published or otherwise busy
    ├── OutOfRange                OUT_OF_RANGE      a capacity range that cannot be met
    ├── ResourceExhausted         RESOURCE_EXHAUSTED   no space left to promise
    ├── Aborted                   ABORTED           another operation on the key is in flight
    ├── Unavailable               UNAVAILABLE       the backend is not ready
    ├── Unimplemented             UNIMPLEMENTED
    ├── ConfigError                                 the configuration cannot be served: elv serve exits
    └── Internal                  INTERNAL
        ├── CommandError                            an external command failed
        │   └── CommandTimeout    DEADLINE_EXCEEDED ... or ran past its deadline (retryable)
        └── CorruptState                            on-disk state contradicts itself

Messages are shown to users (Kubernetes turns them into events), so they
must never contain secrets; they say what is wrong and, where it helps,
what to do about it.

This module imports nothing else from csi.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


class ElvError(Exception):
    """Base of the tree; maps to INTERNAL unless a subclass says otherwise."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ElvError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownClass(InvalidArgument):
    """The parameters name a class of volume this node does not have (an LVM
    device class it is not configured with). CreateVolume refuses it; for
    GetCapacity it means "no capacity here", as another node may have it."""


class NotFound(ElvError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ElvError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ElvError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InUse(FailedPrecondition):
    """The object is staged, published, or a source of a running copy."""


class OutOfRange(ElvError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(ElvError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(ElvError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ElvError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ElvError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ConfigError(ElvError):
    """A flag or the LVM class file asks for something the driver cannot do.

    Raised while the driver is built, before it serves anything; ``elv``
    prints it and exits, so it never becomes an RPC's answer."""


class Internal(ElvError):
    code = grpc.StatusCode.INTERNAL


class CorruptState(Internal):
    """Metadata and data disagree in a way the driver will not guess about."""


def _tail(data: bytes, limit: int = 300) -> str:
    text = data.decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last[-limit:]


class CommandError(Internal):
    """An external command exited with a status it was not allowed to.

    Keeps the whole argv, exit status and output for logs and for the
    classifiers that live next to each tool's wrapper; ``str()`` stays short.
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = _tail(stderr) or _tail(stdout)
        name = self.argv[0] if self.argv else "?"
        msg = f"{name} exited with status {returncode}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class CommandTimeout(CommandError):
    """The command ran past its deadline and was killed. Callers treat
    DEADLINE_EXCEEDED as "may still be in progress" and retry."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(argv, -9)
        self.timeout = timeout
        name = self.argv[0] if self.argv else "?"
        self.message = f"{name} did not finish within {timeout:g}s and was killed"
        self.args = (self.message,)
