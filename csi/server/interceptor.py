"""The one place RPCs are logged and errors become gRPC statuses.

Each call gets one log line: method, the volume or snapshot it concerns, the
gRPC code and the duration. Driver errors (csi.errors) become their own
codes; any other exception becomes INTERNAL with its traceback in the log,
so a client never sees UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from csi.errors import ElvError
from csi.server.log import redact

log = logging.getLogger("csi.rpc")

#: Called after every RPC: (method, code name, seconds).
RpcObserver = Callable[[str, str, float], None]
Handler = Callable[[Any, Any], Any]
Context = grpc.aio.ServicerContext[Any, Any]
_ID_FIELDS = ("volume_id", "snapshot_id", "group_snapshot_id", "source_volume_id", "name")
_QUIET = frozenset(
    {"Probe", "NodeGetCapabilities", "ControllerGetCapabilities", "GetPluginCapabilities", "GetPluginInfo"}
)


def subject(request: Any) -> str:
    """The object a request is about, for the log line."""
    for f in _ID_FIELDS:
        value = getattr(request, f, "")
        if value:
            return str(value)[:160]
    return ""


class RpcInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, observer: RpcObserver | None = None) -> None:
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await self._serve(method, inner, request, context)

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _serve(self, method: str, inner: Handler, request: Any, context: Context) -> Any:
        """Run one RPC; a failure becomes its gRPC status here, and nowhere else."""
        start = time.monotonic()
        code = grpc.StatusCode.OK
        message = ""
        try:
            return await _call(method, inner, request, context)
        except ElvError as e:
            code, message = e.code, e.message
        except NotImplementedError:
            code, message = grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this driver"
        except asyncio.CancelledError:
            code, message = grpc.StatusCode.CANCELLED, "cancelled by the client"
            raise
        except Exception as e:
            log.exception("unexpected error in %s", method, extra={"fields": {"rpc": method}})
            code = grpc.StatusCode.INTERNAL
            message = f"internal error in {method}: {type(e).__name__}; see the driver log"
        finally:
            self._record(method, request, code, message, time.monotonic() - start)
        await context.abort(code, message)

    def _record(self, method: str, request: Any, code: grpc.StatusCode, message: str, seconds: float) -> None:
        """The RPC's one log line, and its metrics."""
        fields = {"rpc": method, "code": code.name, "ms": round(seconds * 1000, 1)}
        target = subject(request)
        if target:
            fields["object"] = target
        if message:
            fields["error"] = message
        level = logging.DEBUG if method in _QUIET and code == grpc.StatusCode.OK else logging.INFO
        log.log(level, "rpc", extra={"fields": fields})
        if self._observer is not None:
            try:
                self._observer(method, code.name, seconds)
            except Exception:
                log.exception("rpc observer failed")


async def _call(method: str, inner: Handler, request: Any, context: Context) -> Any:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request", extra={"fields": {"rpc": method, "request": redact(request)}})
    result = inner(request, context)
    if inspect.isawaitable(result):
        result = await result
    return result
