"""The HTTP proxy: an HTTP server in its own process, forwarding to ingress replicas.

Each request is matched to the application with the longest route prefix
(pushed by the controller), then sent with its body to a replica of that
application's ingress deployment through an ordinary router; the replica's
response comes back as a stream of ASGI messages.  The proxy serves HTTP
itself (``http_server.py``, ``http_forward.py``), or through uvicorn and
``ProxyApp``'s ASGI interface when the user configures middlewares; either
way over TLS when ``http_options`` give a certificate (``tls.py``).  User
code never runs here, and nothing a client sends is ever unpickled: the
proxy only pickles the scope and body it built itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, cast

from .._core import context as _context
from .._core.errors import LadleError, RequestCancelledError
from .._core.loop import background_loop
from .._core.snapshots import ROUTES, hub
from .._core.transport import ReplySink
from .._core.types import SYSTEM_PREFIX, DeploymentID, RouteTable
from . import control_link
from .asgi import HTTP_METHOD, WEBSOCKET_METHOD, reason_phrase
from .handle import DeploymentHandle
from .router import Router, router_for
from .tls import TlsFiles, server_context

MODEL_ID_HEADER = b"serve_multiplexed_model_id"
REQUEST_ID_HEADER = b"x-request-id"
# httptools puts no bound on header size; h11 (uvicorn's other parser) stops at 16 KiB.
# Anything past this is refused with 431 rather than shipped to a replica.
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = 5.0
    max_request_body_bytes: int = 100 * 1024 * 1024
    middlewares: tuple[Any, ...] = ()
    debug: bool = False
    access_log: bool = False
    controller_address: str = ""
    tls: TlsFiles | None = None  # HTTPS
    extras: dict[str, Any] = field(default_factory=dict)


class _Route:
    __slots__ = ("prefix", "deployment_id", "handle", "ws_handle", "_router")

    def __init__(self, prefix: str, deployment_id: DeploymentID) -> None:
        self.prefix = prefix
        self.deployment_id = deployment_id
        base = DeploymentHandle(deployment_id.name, deployment_id.app_name)
        self.handle = base.options(method_name=HTTP_METHOD, stream=True)
        self.ws_handle = base.options(method_name=WEBSOCKET_METHOD, stream=True)
        self._router: Router | None = None

    def router(self, loop: asyncio.AbstractEventLoop) -> Router:
        """The ingress deployment's router on the proxy's loop."""
        router = self._router
        if router is None:
            router = self._router = router_for(self.deployment_id, loop)
        return router


class Early:
    """A response the proxy gives without a replica (with the request's id, as all are)."""

    __slots__ = ("status", "body", "media_type", "request_id")

    def __init__(self, status: int, body: bytes,
                 media_type: bytes = b"text/plain; charset=utf-8") -> None:
        self.status = status
        self.body = body
        self.media_type = media_type
        self.request_id = ""


class ProxyApp:
    """The proxy's ASGI app (wrapped by the user's middlewares)."""

    def __init__(self, config: ProxyConfig) -> None:
        self._config = config
        self._scheme = "https" if config.tls is not None else "http"
        self._routes: list[_Route] = []
        self._ever_routed = False  # a route has existed (Ray Serve's "route table populated")
        self.routes_version = 0
        self._routes_changed = asyncio.Event()

    def set_routes(self, table: RouteTable) -> None:
        # Longest prefix first, so the first match is the best one.
        self._routes = [_Route(prefix, dep) for prefix, dep in
                        sorted(table.routes, key=lambda r: -len(r[0]))]
        self._ever_routed = self._ever_routed or bool(self._routes)
        self.routes_version = max(self.routes_version, table.version)
        self._routes_changed.set()

    async def wait_routes(self, version: int) -> int:
        """Return once routes at least as new as ``version`` are in use."""
        while self.routes_version < version:
            self._routes_changed.clear()
            await self._routes_changed.wait()
        return self.routes_version

    def _match(self, path: str) -> _Route | None:
        for route in self._routes:
            prefix = route.prefix
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return route
        return None

    def triage(self, path: str, headers: list[tuple[bytes, bytes]],
               http_version: str) -> Early | tuple[_Route, str, str]:
        """Where a request goes: ``(route, request id, model id)``, or an answer."""
        # One pass over the headers: limits, Host, and the two headers ladle reads.
        size = 0
        has_host = False
        request_id = model_id = ""
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"host":
                has_host = True
            elif name == REQUEST_ID_HEADER:
                request_id = value.decode("latin-1")
            elif name == MODEL_ID_HEADER:
                model_id = value.decode("latin-1")
        request_id = request_id or _context.new_request_id()
        if size > MAX_HEADER_BYTES:
            early = Early(431, f"Request headers larger than {MAX_HEADER_BYTES} bytes.".encode())
        elif not has_host and http_version == "1.1":
            early = Early(400, b"HTTP/1.1 requests need a Host header.")  # RFC 9112, 3.2
        elif path.startswith("/-/"):
            early = self._builtin(path)
        else:
            route = self._match(path)
            if route is not None:
                return route, request_id, model_id
            early = Early(404, f"Path '{self._config.root_path}{path}' not found. Ping "
                          "http://.../-/routes for available routes.".encode())
        early.request_id = request_id
        return early

    def _child_root_path(self, route: _Route) -> str:
        return self._config.root_path + ("" if route.prefix == "/" else route.prefix)

    def child_scope(self, http_version: str, method: str, path: str, raw_path: bytes,
                    query_string: bytes, headers: list[tuple[bytes, bytes]],
                    client: Any, server: Any, route: _Route) -> tuple[Any, ...]:
        """The scope the replica sees, packed (``asgi.http_scope`` unpacks it).

        Ray Serve's (and uvicorn's) ``root_path``: an upstream proxy stripped it
        from the request, so it is put back in front of the path, and it and
        the route prefix make the app's ``root_path``."""
        root_path = self._config.root_path
        if root_path:
            path = root_path + path
            raw_path = root_path.encode() + raw_path
        return (http_version, method, path, raw_path, query_string, headers, client, server,
                self._child_root_path(route), self._scheme)

    def _builtin(self, path: str) -> Early:
        if path in ("/-/healthz", "/-/routes"):
            if not self._ever_routed:
                # Ray Serve's answer: a load balancer should not send traffic here yet
                # (once ready, it stays so: an app may come back at any time).
                return Early(503, b"Route table is not populated yet.")
            if path == "/-/healthz":
                return Early(200, b"success")
            body = json.dumps({r.prefix: r.deployment_id.app_name for r in self._routes},
                              separators=(",", ":"))  # compact, as Ray Serve writes it
            return Early(200, body.encode(), b"application/json")
        return Early(404, f"Path '{path}' not found.".encode())

    # ------------------------------------------------- the ASGI app (under uvicorn)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)

    async def _http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        triaged = self.triage(scope["path"], scope["headers"], scope.get("http_version", "1.1"))
        if isinstance(triaged, Early):
            await _send_bytes(send, triaged.status, triaged.body, triaged.media_type,
                              triaged.request_id)
            return
        route, request_id, model_id = triaged
        # request_timeout_s bounds the whole request, a client trickling its body included.
        timeout_s = self._config.request_timeout_s
        deadline = None
        if timeout_s is None:
            body = await self._read_body(receive, send)
        else:
            deadline = asyncio.get_running_loop().time() + timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    body = await self._read_body(receive, send)
            except TimeoutError:
                await _send_text(send, 408, timed_out_text(request_id, timeout_s), request_id,
                                 close=True)
                return
        if body is None:
            return
        child = self.child_scope(scope.get("http_version", "1.1"), scope["method"],
                                 scope["path"], scope.get("raw_path") or scope["path"].encode(),
                                 scope.get("query_string", b""), list(scope["headers"]),
                                 scope.get("client"), scope.get("server"), route)
        _context.set_request(_context.RequestContext(
            request_id, route.prefix, route.deployment_id.app_name, model_id,
            track_children=False))
        handle = route.handle
        if model_id:
            handle = handle.options(multiplexed_model_id=model_id)
        # The replica turns user errors into responses: it needs to know about debug.
        gen = handle.remote(child, body, self._config.debug)
        started = [False]
        if deadline is None:
            await self._forward(gen, request_id, receive, send, started)
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._forward(gen, request_id, receive, send, started)
            except TimeoutError:
                gen.cancel()
                if not started[0]:
                    await _send_text(send, 408, timed_out_text(request_id, timeout_s),
                                     request_id)

    def _ws_child_scope(self, scope: dict[str, Any], route: _Route) -> dict[str, Any]:
        child = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
        child["headers"] = list(scope["headers"])
        child["root_path"] = self._child_root_path(route)
        root_path = self._config.root_path
        if root_path:  # as for HTTP (child_scope)
            child["path"] = root_path + scope["path"]
            child["raw_path"] = root_path.encode() + (scope.get("raw_path") or
                                                       scope["path"].encode())
        return child

    async def _websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = self._match(scope["path"])
        if route is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        request_id = _context.new_request_id()
        _context.set_request(_context.RequestContext(
            request_id, route.prefix, route.deployment_id.app_name, "",
            track_children=False))
        gen: Any = route.ws_handle.remote(self._ws_child_scope(scope, route))

        async def client_to_replica() -> None:
            while True:
                message = await receive()
                gen._send_input(message)
                if message["type"] == "websocket.disconnect":
                    return

        pump = asyncio.get_running_loop().create_task(client_to_replica())
        try:
            async for message in gen:
                await send(message)
        except Exception:
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})
        finally:
            pump.cancel()
            gen.cancel()

    async def _forward(self, gen: Any, request_id: str, receive: Any, send: Any,
                       started: list[bool]) -> None:
        buffer = gen._req.target
        loop = asyncio.get_running_loop()
        # Most responses are back before a client could go away: only watch for a
        # disconnect (a task per request) once a response takes a while.
        watcher: list[Any] = []
        watcher.append(loop.call_later(_WATCH_AFTER_S, _watch, receive, gen, watcher))
        try:
            while True:
                try:
                    item = await buffer.next_async()
                except StopAsyncIteration:
                    break
                if type(item) is tuple:
                    start, item = item
                    headers = start.get("headers")
                    if type(headers) is not list:
                        headers = start["headers"] = list(headers or ())
                    headers.append((REQUEST_ID_HEADER, request_id.encode()))
                    started[0] = True
                    await send(start)
                ready = buffer.take_ready()
                if ready:
                    item = _merge_bodies(item, ready)
                    for extra in ready:
                        await send(_bytes_body(item))
                        item = extra
                await send(_bytes_body(item))
        except RequestCancelledError:
            pass  # the client went away
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if started[0]:
                return  # cut the response short; the client sees a closed stream
            status = exc.status_code if isinstance(exc, LadleError) else 500
            text = f"{type(exc).__name__}: {exc}" if self._config.debug else reason_phrase(status)
            await _send_text(send, status, text, request_id)
        finally:
            watcher[0].cancel()  # the timer, or the watching task it started

    async def _read_body(self, receive: Any, send: Any) -> bytes | None:
        limit = self._config.max_request_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await _send_text(send, 413, f"Request body larger than {limit} bytes.",
                                     close=True)
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

# What the replica gets of the client's scope (never the server's own objects).
_SCOPE_KEYS = ("type", "asgi", "http_version", "method", "scheme", "path", "raw_path",
               "query_string", "client", "server", "subprotocols")


_WATCH_AFTER_S = 0.05


def _watch(receive: Any, gen: Any, watcher: list[Any]) -> None:
    """Start watching for the client going away (the timer of ``_forward`` fired)."""
    watcher[0] = asyncio.get_running_loop().create_task(_on_disconnect(receive, gen))


async def _on_disconnect(receive: Any, gen: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return


def _bytes_body(item: Any) -> Any:
    """ASGI wants ``bytes`` bodies; large ones arrive as views of shared memory."""
    if type(item.get("body")) is memoryview:
        return {**item, "body": bytes(item["body"])}
    return item


def _merge_bodies(item: Any, ready: list[Any]) -> Any:
    """Fold body chunks that are already here into ``item``; ``ready`` keeps the rest.

    One ``send`` per batch instead of per chunk; the bytes are the same.
    """
    if item.get("type") != "http.response.body" or not item.get("more_body"):
        return item
    chunks = [item["body"]]
    while ready and type(ready[0]) is dict and ready[0].get("type") == "http.response.body":
        nxt = ready.pop(0)
        chunks.append(nxt.get("body", b""))
        if not nxt.get("more_body"):
            return {"type": "http.response.body", "body": b"".join(chunks)}
    return {"type": "http.response.body", "body": b"".join(chunks), "more_body": True}


async def _send_text(send: Any, status: int, text: str, request_id: str = "", *,
                     close: bool = False) -> None:
    """``close`` ends the connection after the response (when the body was left unread)."""
    await _send_bytes(send, status, text.encode(), b"text/plain; charset=utf-8", request_id,
                      close=close)


async def _send_bytes(send: Any, status: int, body: bytes, media_type: bytes,
                      request_id: str = "", *, close: bool = False) -> None:
    headers = [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def timed_out_text(request_id: str, timeout_s: float | None) -> str:
    return f"Request {request_id} timed out after {timeout_s}s."


def bind_http_socket(host: str, port: int) -> socket.socket:
    """The listening socket, or an error that names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LadleError(f"The HTTP proxy could not listen on {host}:{port}: {exc.strerror}. "
                         "Is another server using that port? Choose another with "
                         "serve.start(http_options={'port': ...}).") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Proxy:
    """The proxy process's Servable: serves HTTP until told to stop."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._stopped: asyncio.Event | None = None
        self._app: ProxyApp | None = None
        self._ssl: ssl.SSLContext | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._stopped = asyncio.Event()
        try:
            asgi, sock = self._build()
            if self.config.middlewares or self.config.access_log:
                await self._run_uvicorn(asgi, sock)
            else:
                await self._run_own_server(asgi, sock)
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
                await self._stopped.wait()
                return
            raise

    def _build(self) -> tuple[Any, socket.socket]:
        config = self.config
        if config.tls is not None:
            self._ssl = server_context(config.tls)  # bad files fail serve.start, not a client
        if config.controller_address:
            control_link.install(config.controller_address, background_loop())
            hub.closed = None
        app = self._app = ProxyApp(config)
        hub.subscribe(ROUTES, asyncio.get_running_loop(), app.set_routes)
        asgi: Any = app
        for middleware in reversed(config.middlewares):
            cls, args, kwargs = middleware
            asgi = cls(asgi, *args, **kwargs)
        return asgi, bind_http_socket(config.host, config.port)

    def _uvicorn_config(self, asgi: Any) -> Any:
        import uvicorn

        config = self.config
        return uvicorn.Config(
            asgi, lifespan="off", http="httptools", loop="none", access_log=config.access_log,
            proxy_headers=False,
            # uvicorn hands this to loop.call_later, so a fraction of a second works.
            timeout_keep_alive=cast(int, config.keep_alive_timeout_s),
            log_level="warning", server_header=False,
            **(config.tls.uvicorn_options() if config.tls is not None else {}))

    async def _run_own_server(self, asgi: Any, sock: socket.socket) -> None:
        """The fast path: ladle's own HTTP/1.1 server; uvicorn only for WebSockets."""
        from .http_forward import Forwarder
        from .http_server import HttpProtocol, HttpServerState

        assert self._ready is not None and self._stopped is not None and self._app is not None
        loop = asyncio.get_running_loop()
        uv_config = self._uvicorn_config(asgi)
        uv_config.load()
        state = HttpServerState(Forwarder(self._app, self.config.debug), self.config,
                                _websocket_upgrader(uv_config))
        server = await loop.create_server(lambda: HttpProtocol(state, MAX_HEADER_BYTES),
                                          sock=sock, backlog=2048, ssl=self._ssl)
        self._ready.set_result({"pid": os.getpid(), "port": sock.getsockname()[1]})
        await self._stopped.wait()
        # Stop accepting, let requests in progress finish (bounded), then close.
        server.close()
        for connection in list(state.connections):
            connection.close_when_idle()
        await state.drain(_DRAIN_S)
        for connection in list(state.connections):
            connection.close()

    async def _run_uvicorn(self, asgi: Any, sock: socket.socket) -> None:
        """With user middlewares: uvicorn, which gives them the whole ASGI protocol."""
        assert self._ready is not None and self._stopped is not None
        loop = asyncio.get_running_loop()
        server = _QuietServer(self._uvicorn_config(asgi))
        serving = loop.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.005)  # uvicorn has no readiness event
        if serving.done():
            raise LadleError("The HTTP server failed to start.")
        self._ready.set_result({"pid": os.getpid(), "port": sock.getsockname()[1]})
        stopping = loop.create_task(self._stopped.wait())
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await serving
        stopping.cancel()

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> asyncio.Future[Any] | None:
        return asyncio.get_running_loop().create_task(self._system(meta[1], args, sink))

    async def _system(self, method: str, args: tuple[Any, ...], sink: ReplySink) -> None:
        assert self._ready is not None and self._stopped is not None
        try:
            name = method[len(SYSTEM_PREFIX):].rstrip("_")
            if name == "ready":
                sink.result(await asyncio.shield(self._ready))
            elif name in ("ping", "health"):
                sink.result(True)
            elif name == "routes":
                await asyncio.shield(self._ready)
                assert self._app is not None
                sink.result(await self._app.wait_routes(args[0]))
            elif name == "stop":
                self._stopped.set()
                sink.result(None)
            else:
                raise LadleError(f"the proxy has no method {method!r}")
        except Exception as exc:
            sink.error(exc)


_DRAIN_S = 10.0


def _websocket_upgrader(uv_config: Any) -> Any:
    """Hand an upgraded connection to uvicorn's WebSocket protocol, as uvicorn itself does."""
    from uvicorn.server import ServerState

    if uv_config.ws_protocol_class is None:
        return None
    server_state = ServerState()

    def upgrade(transport: Any, request: bytes) -> None:
        protocol = uv_config.ws_protocol_class(config=uv_config, server_state=server_state,
                                               app_state={})
        protocol.connection_made(transport)
        protocol.data_received(request)
        transport.set_protocol(protocol)

    return upgrade


def _quiet_server_class() -> Any:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn without its signal handlers: the process's owner decides when to stop."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return QuietServer


def _QuietServer(config: Any) -> Any:  # noqa: N802 - a class made on first use
    return _quiet_server_class()(config)
