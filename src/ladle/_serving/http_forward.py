"""Forwarding a parsed request to an ingress replica, and its response back, without ASGI.

The proxy's own server (``http_server.py``) hands each request to a
``Forwarder``; the request goes to the route's router as a streaming call
whose receiver is an ``HttpExchange``, and the replica's ASGI messages are
written to the client as the data plane delivers them, on the same loop and
in the same callback: no task, no coroutine, no queue per request.  Flow
control is the stream's credit: credit goes back as items are written, and
is held while the client reads slower than the response is produced.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .._core.errors import LadleError, RequestCancelledError
from .asgi import HTTP_METHOD, reason_phrase
from .http_server import HttpProtocol, ParsedRequest, simple_response, status_line
from .proxy import Early, ProxyApp, timed_out_text
from .router import SENT, Router, Request as RoutedRequest
from .streams import STREAM_WINDOW

_HALF_WINDOW = STREAM_WINDOW >> 1
_TEXT = b"text/plain; charset=utf-8"
_NO_BODY_STATUSES = frozenset((204, 304))


class Forwarder:
    """The ``forward`` of ``HttpServerState``: answers at once, or starts an exchange."""

    def __init__(self, app: ProxyApp, debug: bool) -> None:
        self._app = app
        self._debug = debug
        self._loop = asyncio.get_running_loop()

    def __call__(self, conn: HttpProtocol, request: ParsedRequest) -> HttpExchange | None:
        app = self._app
        triaged = app.triage(request.path, request.headers, request.http_version)
        if isinstance(triaged, Early):
            status, body, media_type = triaged.status, triaged.body, triaged.media_type
            rid = [(b"x-request-id", triaged.request_id.encode())]
            conn.write(simple_response(status, body, media_type, rid,
                                       close=not request.keep_alive))
            conn.finished(request.keep_alive)
            return None
        route, request_id, model_id = triaged
        exchange = HttpExchange(conn, request_id, request.method == "HEAD", request.keep_alive,
                                self._debug)
        scope = app.child_scope(request.http_version, request.method, request.path,
                                request.raw_path, request.query_string, request.headers,
                                conn.client, conn.server, route)
        # The replica turns user errors into responses: it needs to know about debug.
        req = RoutedRequest((request_id, HTTP_METHOD, model_id, True, route.prefix),
                            (scope, request.body, self._debug), {}, exchange, True,
                            STREAM_WINDOW)
        router = route.router(self._loop)
        exchange.req = req
        exchange.router = router
        router.assign(req)
        return None if exchange.done else exchange


class HttpExchange:
    """One request in flight: the router's ``StreamReceiver``, writing the response."""

    __slots__ = ("_conn", "_request_id", "_keep_alive", "_debug", "started",
                 "_chunked", "_bodyless", "done", "_consumed", "_held", "_out", "_chunks",
                 "_flush_handle", "req", "router", "_streaming")

    def __init__(self, conn: HttpProtocol, request_id: str, head_only: bool, keep_alive: bool,
                 debug: bool) -> None:
        self._conn = conn
        self._request_id = request_id
        self._keep_alive = keep_alive
        self._debug = debug
        self.started = False
        self._chunked = False
        self._bodyless = head_only  # HEAD, 204, 304: the head only
        self.done = False
        self._consumed = 0
        self._held = 0  # credit not yet granted: the client is not reading
        self._out: list[bytes] = []
        self._chunks: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._streaming = False
        self.req: RoutedRequest | None = None
        self.router: Router | None = None

    # ------------------------------------------------ StreamReceiver (data plane)

    def push(self, item: Any) -> None:
        if self.done:
            return
        try:
            if type(item) is tuple:
                start, item = item
                self._head(start, item)
            elif item.get("type") == "http.response.start":
                self._head(item, None)
                item = None
            if item is not None and item.get("type") == "http.response.body":
                if not self.started:
                    raise ValueError("a response body before its start")
                self._body(item.get("body", b""), item.get("more_body", False))
        except Exception as exc:  # a malformed response from the replica's app
            self._answer_error(exc, cancel=True)
            return
        consumed = self._consumed + 1
        if consumed >= _HALF_WINDOW:
            consumed = 0
            self._grant(_HALF_WINDOW)
        self._consumed = consumed

    def end(self) -> None:
        if not self.done:
            # The app returned without completing its response.
            self._answer_error(RuntimeError("the response ended before its last body"))

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self._answer_error(exc)

    # ------------------------------------------------------------ connection

    def client_gone(self) -> None:
        if not self.done:
            self._stop()
            self._cancel()

    def time_out(self) -> None:
        if self.done:
            return
        if self.started:
            self._stop()
            self._conn.close()
        else:
            self._reply_text(408, timed_out_text(self._request_id,
                                                 self._conn._config.request_timeout_s))
        self._cancel()

    def resume(self) -> None:
        held, self._held = self._held, 0
        if held:
            self._grant(held)

    # ------------------------------------------------------------------- writing

    def _head(self, start: dict[str, Any], first: Any) -> None:
        if self.started:
            raise ValueError("a second response start")
        status = start.get("status", 200)
        if type(status) is not int or not 100 <= status <= 999:
            raise ValueError(f"invalid status {status!r}")
        if status in _NO_BODY_STATUSES:
            self._bodyless = True
        parts = [status_line(status)]
        has_length = False
        headers = start.get("headers", ())
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                has_length = True
            elif lowered == b"connection" and value.lower() == b"close":
                self._keep_alive = False
            parts += [name, b": ", value, b"\r\n"]
        parts += [b"x-request-id: ", self._request_id.encode(), b"\r\n"]
        if not has_length and status not in _NO_BODY_STATUSES:
            if first is not None and first.get("more_body", False):
                self._chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                body = b"" if first is None else first.get("body", b"")
                parts += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
        if not self._keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        # Every line break in the head must be one of ours: a header from the replica
        # may not smuggle another header or a second response.
        lines = len(headers) + 3 + (not self._keep_alive) + (
            not has_length and status not in _NO_BODY_STATUSES)
        if head.count(b"\n") != lines or head.count(b"\r") != lines or b"\0" in head:
            raise ValueError("a response header holds CR, LF or NUL")
        self._out.append(head)
        self.started = True

    def _body(self, body: bytes, more: bool) -> None:
        if body and not self._bodyless:
            (self._chunks if self._chunked else self._out).append(body)
        if more:
            if not self._streaming:
                # The head and the first chunk go to the client at once (time to
                # first byte); later chunks that arrive together leave together.
                self._streaming = True
                self._flush()
                self._conn.flush()
            elif self._flush_handle is None:
                # Chunks that arrive together leave together, at the end of this pass.
                self._flush_handle = self._conn._loop.call_soon(self._flush)
            return
        if self._chunked:
            self._frame_chunk()
            self._out.append(b"0\r\n\r\n")
        self._flush()
        self.done = True
        self._conn.finished(self._keep_alive)

    def _frame_chunk(self) -> None:
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._out += [b"%x\r\n" % len(data), data, b"\r\n"]

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._chunked:
            self._frame_chunk()
        out = self._out
        if out:
            self._conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _answer_error(self, exc: BaseException, *, cancel: bool = False) -> None:
        """The replica failed (or sent garbage): a status if nothing went out yet, else cut."""
        if self.started or isinstance(exc, RequestCancelledError):
            self._stop()
            self._conn.close()
        else:
            status = exc.status_code if isinstance(exc, LadleError) else 500
            text = f"{type(exc).__name__}: {exc}" if self._debug else reason_phrase(status)
            self._reply_text(status, text)
        if cancel:
            self._cancel()

    def _reply_text(self, status: int, text: str) -> None:
        self._stop()
        rid = (b"x-request-id", self._request_id.encode())
        self._conn.write(simple_response(status, text.encode(), _TEXT, [rid],
                                         close=not self._keep_alive))
        self._conn.finished(self._keep_alive)

    def _stop(self) -> None:
        self.done = True
        self._out.clear()
        self._chunks.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _cancel(self) -> None:
        req = self.req
        if req is not None and self.router is not None:
            self.router.cancel(req)  # our fail() is a no-op now: done is set

    def _grant(self, n: int) -> None:
        if self._conn.paused:
            self._held += n
            return
        req = self.req
        if req is not None and req.state == SENT and req.slot is not None:
            remote = req.slot.remote
            if remote is not None:
                remote.grant(req.key, n)
