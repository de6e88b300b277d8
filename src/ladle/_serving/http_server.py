"""The proxy's own HTTP/1.1 server: httptools parsing, no ASGI in between.

uvicorn costs about as much per request as all of ladle's forwarding, and a
task plus a chain of ASGI coroutines per request cost about as much again.
The proxy needs neither: the body is read whole (the replica gets it in one
piece anyway), and the replica's response arrives as complete ASGI messages
that can be written as they come.  So each parsed request goes straight to
a ``forward`` callable (``http_forward.py``), which answers through this
connection's ``write``/``finished``.  A connection is handed to uvicorn only
to upgrade it to a WebSocket.  When the user configures middlewares, the
proxy runs uvicorn instead (see ``proxy.py``): they need the full ASGI
protocol.

Per connection, requests are answered one at a time in arrival order
(pipelined requests wait their turn).  Limits: header bytes, body bytes,
``request_timeout_s`` from the first byte of a request to the last byte of its
response, and an idle keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

_MAX_PIPELINED = 16
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} \r\n".encode()


def simple_response(status: int, body: bytes, media_type: bytes,
                    extra: list[tuple[bytes, bytes]] | None = None, *,
                    close: bool = False) -> bytes:
    """A whole response with a known body, as bytes."""
    parts = [status_line(status), b"content-type: ", media_type, b"\r\ncontent-length: ",
             str(len(body)).encode(), b"\r\n"]
    for name, value in extra or ():
        parts += [name, b": ", value, b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


class ParsedRequest:
    """One parsed request, body included."""

    __slots__ = ("method", "url", "raw_path", "path", "query_string", "headers", "body",
                 "http_version", "keep_alive")

    def __init__(self, method: str, url: bytes, raw_path: bytes, path: str, query_string: bytes,
                 headers: list[tuple[bytes, bytes]], body: bytes, http_version: str,
                 keep_alive: bool) -> None:
        self.method = method
        self.url = url
        self.raw_path = raw_path
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.body = body
        self.http_version = http_version
        self.keep_alive = keep_alive


class Exchange(Protocol):
    """What ``forward`` returns for a request still in flight."""

    def client_gone(self) -> None: ...
    def time_out(self) -> None: ...
    def resume(self) -> None: ...


Forward = Callable[["HttpProtocol", ParsedRequest], "Exchange | None"]


class HttpServerState:
    """What all connections of one server share."""

    def __init__(self, forward: Forward, config: Any, ws_upgrade: Any) -> None:
        self.forward = forward
        self.config = config
        self.ws_upgrade = ws_upgrade  # (transport, request bytes) -> None, or None
        self.connections: set[HttpProtocol] = set()
        self.in_flight = 0
        self._drained: asyncio.Future[None] | None = None
        self._unflushed: list[HttpProtocol] = []
        self._loop = asyncio.get_running_loop()

    def flush_later(self, conn: HttpProtocol) -> None:
        # Responses are written at the end of the loop pass, after the data plane has
        # sent the requests that the freed replica slots let through: the replica
        # works on those while this process writes to its clients.
        if not self._unflushed:
            self._loop.call_soon(self._flush_all)
        self._unflushed.append(conn)

    def _flush_all(self) -> None:
        unflushed, self._unflushed = self._unflushed, []
        for conn in unflushed:
            conn.flush()

    def request_done(self) -> None:
        self.in_flight -= 1
        drained = self._drained
        if self.in_flight == 0 and drained is not None and not drained.done():
            drained.set_result(None)

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) until no request is in flight."""
        if self.in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._drained], timeout=timeout_s)


class HttpProtocol(asyncio.Protocol):
    def __init__(self, state: HttpServerState, max_header_bytes: int) -> None:
        self._state = state
        self._config = state.config
        self._loop = asyncio.get_running_loop()
        self._max_header_bytes = max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._pending: deque[ParsedRequest] = deque()
        self._out: list[bytes] | None = None  # written at the end of the loop pass
        self._exchange: Exchange | None = None
        self._busy = False
        self._dispatching = False
        self.closed = False
        self.paused = False  # the client reads slower than responses are written
        self._idle = False
        self._idle_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._too_large = 0  # the status to answer when a limit stopped the parser

    # ------------------------------------------------------------ connection

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._state.connections.add(self)
        sock = transport.get_extra_info("socket")
        try:
            self.server = sock.getsockname()[:2]
            self.client = sock.getpeername()[:2]
        except (AttributeError, OSError):
            pass
        self._become_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._state.connections.discard(self)
        self._cancel_timers()
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.client_gone()
            self._state.request_done()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._exchange is not None:
            self._exchange.resume()

    def data_received(self, data: bytes) -> None:
        self._idle = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0]:] if upgrade.args else b"")
        except httptools.HttpParserError:
            if self._too_large == 431:
                self.reject(431, "Request headers too large.")
            elif self._too_large == 413:
                self.reject(413, "Request body too large.")
            else:
                self.reject(400, "Invalid HTTP request.")

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the client; it is sent at the end of this loop pass."""
        if self.closed:
            return
        out = self._out
        if out is None:
            self._out = [data]
            self._state.flush_later(self)
        else:
            out.append(data)

    def flush(self) -> None:
        out, self._out = self._out, None
        if out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def reject(self, status: int, text: str) -> None:
        """Answer an unparseable or oversized request and close the connection."""
        if not self.closed:
            self.write(simple_response(status, text.encode(), b"text/plain; charset=utf-8",
                                       close=True))
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True
            self._cancel_timers()
            self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._idle_timer, self._request_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._request_timer = None

    def _become_idle(self) -> None:
        # One timer per keep-alive period, not one per request: it re-arms itself
        # while the connection keeps being used.
        self._idle = True
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._config.keep_alive_timeout_s,
                                                     self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if not self._idle or self._busy:
            return  # re-armed when the connection is idle again
        left = self._idle_since + self._config.keep_alive_timeout_s - self._loop.time()
        if left > 0.001:
            self._idle_timer = self._loop.call_later(left, self._idle_check)
        else:
            self.close()

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
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._config.max_request_body_bytes:
            self._too_large = 413
            raise httptools.HttpParserError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._parser.should_upgrade():
            return
        url = self._url
        try:
            if url[:1] == b"/" and b"%" not in url and b"?" not in url and b"#" not in url:
                raw_path, path, query = url, url.decode("ascii"), b""  # the usual case
            else:
                parsed = httptools.parse_url(url)
                raw_path = parsed.path
                path = unquote(raw_path.decode("ascii"))
                query = parsed.query or b""
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            self.reject(400, "Invalid request target.")
            return
        parser = self._parser
        body = self._body
        self._pending.append(ParsedRequest(
            parser.get_method().decode("ascii"), url, raw_path, path, query, self._headers,
            body[0] if len(body) == 1 else b"".join(body), parser.get_http_version(),
            parser.should_keep_alive()))
        if len(self._pending) > _MAX_PIPELINED:
            self.transport.pause_reading()  # a pipelining client waits for answers
        if not self._busy:
            self._next()

    # --------------------------------------------------------------- requests

    def _next(self) -> None:
        pending = self._pending
        state = self._state
        while pending and not self.closed:
            request = pending.popleft()
            if len(pending) == _MAX_PIPELINED:
                self.transport.resume_reading()
            self._busy = True
            state.in_flight += 1
            self._dispatching = True
            try:
                exchange = state.forward(self, request)
            except Exception:
                self._dispatching = False
                self.reject(500, "Internal Server Error")
                state.request_done()
                return
            self._dispatching = False
            if self._busy:
                self._exchange = exchange  # answered later, through finished()
                return
        if not self.closed:
            self._become_idle()

    def finished(self, keep_alive: bool) -> None:
        """The current request's response is complete (``keep_alive``: the connection stays)."""
        self._busy = False
        self._exchange = None
        self._state.request_done()
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        if not keep_alive:
            self.close()
        elif not self._dispatching:
            self._next()

    def _timed_out(self) -> None:
        self._request_timer = None
        exchange = self._exchange
        if exchange is not None:
            exchange.time_out()  # answers 408 (if it still can) and cancels the request
        elif not self._busy:
            self.reject(408, "Request timed out.")

    def _upgrade(self, rest: bytes) -> None:
        upgrade = self._state.ws_upgrade
        if upgrade is None or self._busy:
            self.reject(400, "Unsupported upgrade request.")
            return
        method = self._parser.get_method()
        request = [method, b" ", self._url, b" HTTP/1.1\r\n"]
        for name, value in self._headers:
            request += [name, b": ", value, b"\r\n"]
        request.append(b"\r\n")
        self._state.connections.discard(self)
        self._cancel_timers()
        self.closed = True  # this protocol is done with the connection
        upgrade(self.transport, b"".join(request) + rest)

    def close_when_idle(self) -> None:
        if not self._busy:
            self.close()


__all__ = ["HttpProtocol", "HttpServerState", "ParsedRequest", "simple_response",
           "status_line"]
