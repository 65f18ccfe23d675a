"""The protocol's transport: HTTP/1.1 POSTs with JSON bodies on a unix socket.

Docker and Podman both speak it with Go's HTTP client: a POST per call,
``Content-Length`` bodies, connections kept alive. This is just enough HTTP
for that, with limits, so nothing a peer sends can make the plugin buffer
without bound. A handler returns an HTTP status and a JSON object; errors
are ``{"Err": "message"}`` with status 500, which both engines print as-is.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1.1+json"
MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024
#: How long an idle kept-alive connection may wait for its next request.
IDLE_TIMEOUT = 300.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Too Large", 500: "Error"}

Handler = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """(method, path, headers with lower-case names) of a request head."""
    try:
        text = head.decode("iso-8859-1")
    except UnicodeDecodeError as e:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "unreadable request") from e
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, f"not an HTTP/1.x request line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(400, "malformed header line")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (an empty body is an empty object)."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise BadRequest(400, f"the request body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest(400, "the request body must be a JSON object")
    return body


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return await _read_chunked(reader)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as e:
        raise BadRequest(400, "bad Content-Length") from e
    if length < 0 or length > MAX_BODY:
        raise BadRequest(413, f"the request body is larger than {MAX_BODY} bytes")
    return await reader.readexactly(length)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError as e:
            raise BadRequest(400, "bad chunk size") from e
        if size == 0:
            await reader.readuntil(b"\r\n")  # the empty trailer
            return bytes(out)
        if size < 0 or len(out) + size > MAX_BODY:
            raise BadRequest(413, f"the request body is larger than {MAX_BODY} bytes")
        out += await reader.readexactly(size)
        await reader.readexactly(2)


def response(status: int, body: dict[str, Any], keep_alive: bool) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(data)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode() + data


async def _one(reader: asyncio.StreamReader, handler: Handler) -> tuple[bytes, bool] | None:
    """Read and answer one request: (the response, keep the connection), or None at EOF."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_TIMEOUT)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    except asyncio.LimitOverrunError:
        return response(413, {"Err": "request head too large"}, False), False
    try:
        method, path, headers = parse_head(head[:-4])
        keep = headers.get("connection", "").lower() != "close"
        body = parse_body(await _read_body(reader, headers))
        if method != "POST":
            return response(405, {"Err": f"{method} is not allowed: the plugin protocol uses POST"}, keep), keep
    except BadRequest as e:
        return response(e.status, {"Err": e.message}, False), False
    status, answer = await handler(path, body)
    return response(status, answer, keep), keep


async def _connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
    try:
        while True:
            try:
                answer = await _one(reader, handler)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if answer is None:
                return
            data, keep = answer
            writer.write(data)
            await writer.drain()
            if not keep:
                return
    except Exception:  # one broken connection must never take the plugin down
        log.exception("connection failed")
    finally:
        writer.close()


async def serve(path: str, handler: Handler) -> asyncio.Server:
    """Listen on the unix socket ``path`` (which must be free) and answer with ``handler``."""
    return await asyncio.start_unix_server(lambda r, w: _connection(r, w, handler), path=path, limit=MAX_HEAD)
