"""The proxy's own HTTP/1.1 server: httptools parsing, straight into ``ProxyApp``.

uvicorn costs about as much per request as all of ladle's forwarding, and the
proxy needs little of it: the body is read whole (the replica gets it in one
piece anyway), responses come back as complete ASGI messages.  So the proxy
serves HTTP itself, and hands a connection to uvicorn only to upgrade it to a
WebSocket.  When the user configures middlewares, the proxy runs uvicorn
instead (see ``proxy.py``): middlewares may need the full ASGI protocol.

Per connection, requests are answered one at a time in arrival order
(pipelined requests wait their turn).  Limits: header bytes, body bytes,
``request_timeout_s`` from the first byte of a request to the last byte of its
response, and an idle keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import httptools

_MAX_PIPELINED = 16
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} \r\n".encode()


class HttpServerState:
    """What all connections of one server share."""

    def __init__(self, app: Any, config: Any, ws_upgrade: Any) -> None:
        self.app = app
        self.config = config
        self.ws_upgrade = ws_upgrade  # (transport, request bytes) -> None, or None
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()


class _Request:
    __slots__ = ("scope", "body", "keep_alive")

    def __init__(self, scope: dict[str, Any], body: bytes, keep_alive: bool) -> None:
        self.scope = scope
        self.body = body
        self.keep_alive = keep_alive


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: HttpServerState, max_header_bytes: int) -> None:
        self._state = state
        self._config = state.config
        self._loop = asyncio.get_running_loop()
        self._max_header_bytes = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None
        self._server: tuple[str, int] | None = None
        self._client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._pending: deque[_Request] = deque()
        self._busy = False
        self._closed = False
        self._disconnected: asyncio.Future[None] = self._loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._too_large = 0  # the status to answer when a limit stopped the parser
        self._writable: asyncio.Future[None] | None = None

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        self._state.connections.add(self)
        sock = transport.get_extra_info("socket")
        try:
            self._server = sock.getsockname()[:2]
            self._client = sock.getpeername()[:2]
        except (AttributeError, OSError):
            pass
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._state.connections.discard(self)
        self._cancel_timers()
        if not self._disconnected.done():
            self._disconnected.set_result(None)
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def drain(self) -> None:
        """Wait while the client reads slower than the response is produced."""
        if self._writable is not None:
            await asyncio.shield(self._writable)

    def data_received(self, data: bytes) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0]:] if upgrade.args else b"")
        except httptools.HttpParserError:
            if self._too_large == 431:
                self._reject(431, "Request headers too large.")
            elif self._too_large == 413:
                self._reject(413, "Request body too large.")
            else:
                self._reject(400, "Invalid HTTP request.")

    def _reject(self, status: int, text: str) -> None:
        """Answer an unparseable or oversized request and close the connection."""
        if self._closed:
            return
        body = text.encode()
        self._transport.write(b"".join((
            _status_line(status), b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n",
            body)))
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel_timers()
            self._transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._request_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._request_timer = None

    def _arm_idle(self) -> None:
        timeout_s = self._config.keep_alive_timeout_s
        self._idle_timer = self._loop.call_later(timeout_s, self._close)

    # ------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_bytes = 0
        timeout_s = self._config.request_timeout_s
        if timeout_s is not None and self._request_timer is None:
            self._request_timer = self._loop.call_later(timeout_s, self._timed_out)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self._max_header_bytes:
            self._too_large = 431
            raise httptools.HttpParserError("headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._parser.should_upgrade():
            return
        for name, value in self._headers:
            if name == b"expect" and value.lower() == b"100-continue" and not self._busy:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._config.max_request_body_bytes:
            self._too_large = 413
            raise httptools.HttpParserError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            return
        try:
            parsed = httptools.parse_url(self._url)
            raw_path = parsed.path
            path = unquote(raw_path.decode("ascii"))
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self._reject(400, "Invalid request target.")
            return
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self._parser.get_http_version(),
            "method": self._parser.get_method().decode("ascii"),
            "scheme": "http", "path": path,
            "raw_path": raw_path, "query_string": parsed.query or b"",
            "headers": self._headers, "client": self._client, "server": self._server,
            "root_path": "",
        }
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._pending.append(_Request(scope, body, self._parser.should_keep_alive()))
        if len(self._pending) > _MAX_PIPELINED:
            self._transport.pause_reading()  # a pipelining client waits for answers
        if not self._busy:
            self._next()

    # --------------------------------------------------------------- requests

    def _next(self) -> None:
        if self._closed or not self._pending:
            self._busy = False
            return
        self._busy = True
        request = self._pending.popleft()
        if len(self._pending) == _MAX_PIPELINED:
            self._transport.resume_reading()
        task = self._loop.create_task(self._run(request))
        self._state.tasks.add(task)
        task.add_done_callback(self._state.tasks.discard)

    async def _run(self, request: _Request) -> None:
        responder = _Response(self, request.scope["method"] == "HEAD", request.keep_alive)
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await asyncio.shield(self._disconnected)
            return {"type": "http.disconnect"}

        try:
            await self._state.app(request.scope, receive, responder.send)
        except Exception:
            if not responder.started:
                responder.fail()
            self._close()
            return
        if self._closed:
            return
        if not responder.complete:
            self._close()  # the app stopped mid-response: the client sees it cut
            return
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        if not responder.keep_alive:
            self._close()
        elif self._pending:
            self._next()
        else:
            self._busy = False
            self._arm_idle()

    def _timed_out(self) -> None:
        self._request_timer = None
        if self._busy:
            return  # the app's own deadline answers 408 (and cancels the request)
        self._reject(408, "Request timed out.")

    def _upgrade(self, rest: bytes) -> None:
        upgrade = self._state.ws_upgrade
        if upgrade is None or self._busy:
            self._reject(400, "Unsupported upgrade request.")
            return
        method = self._parser.get_method()
        request = [method, b" ", self._url, b" HTTP/1.1\r\n"]
        for name, value in self._headers:
            request += [name, b": ", value, b"\r\n"]
        request.append(b"\r\n")
        self._state.connections.discard(self)
        self._cancel_timers()
        self._closed = True  # this protocol is done with the connection
        upgrade(self._transport, b"".join(request) + rest)

    def close_when_idle(self) -> None:
        if not self._busy:
            self._close()


class _Response:
    """The ASGI ``send`` of one request: writes the HTTP response to the transport."""

    __slots__ = ("_protocol", "_transport", "_head", "keep_alive", "started", "complete",
                 "_chunked", "_start")

    def __init__(self, protocol: HttpProtocol, head: bool, keep_alive: bool) -> None:
        self._protocol = protocol
        self._transport = protocol._transport
        self._head = head
        self.keep_alive = keep_alive
        self.started = False
        self.complete = False
        self._chunked = False
        self._start: dict[str, Any] | None = None

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            self.started = True
            return
        if kind != "http.response.body" or self.complete:
            return
        body = message.get("body", b"")
        more = message.get("more_body", False)
        out: list[bytes] = []
        if self._start is not None:
            out.append(self._head_bytes(body, more))
            self._start = None
        if not self._head:
            if self._chunked:
                if body:
                    out += [b"%x\r\n" % len(body), body, b"\r\n"]
                if not more:
                    out.append(b"0\r\n\r\n")
            elif body:
                out.append(body)
        if not more:
            self.complete = True
        if out:
            self._transport.write(b"".join(out) if len(out) > 1 else out[0])
            if more:
                await self._protocol.drain()

    def _head_bytes(self, body: bytes, more: bool) -> bytes:
        start = self._start
        assert start is not None
        parts = [_status_line(start.get("status", 200))]
        has_length = False
        for name, value in start.get("headers", ()):
            lowered = name.lower()
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"connection" and value.lower() == b"close":
                self.keep_alive = False
            parts += [name, b": ", value, b"\r\n"]
        if not has_length:
            if more:
                self._chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                parts += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def fail(self) -> None:
        self._transport.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 21\r\n"
                              b"connection: close\r\n\r\nInternal Server Error")
        self.complete = True


__all__ = ["HttpProtocol", "HttpServerState"]
