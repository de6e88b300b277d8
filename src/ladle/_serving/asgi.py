"""HTTP inside a replica: run one proxied request through the user's code.

The proxy sends the request's ASGI scope and body; the replica answers with
the ASGI messages of the response, streamed back item by item.  An ingress
deployment (``@serve.ingress``) runs its ASGI app; any other deployment gets
a ``starlette.requests.Request`` and its return value is turned into a
response (``str`` → text, ``bytes`` → raw, a ``Response`` as is, anything
else → JSON).  Starlette is imported on the first HTTP request only.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import traceback
import types
from collections.abc import Awaitable, Callable
from typing import Any

from .._core.errors import LadleError
from .._core.serialization import OutOfBand
from .._core.shared_memory import MIN_BYTES as _OUT_OF_BAND_BYTES
from .._core.transport import ReplySink
from .user_code import UserCallable

logger = logging.getLogger("ladle.replica")

# The method names proxies call: dunder names are not callable user methods.
HTTP_METHOD = "__serve_http__"
WEBSOCKET_METHOD = "__serve_websocket__"
# Set by @serve.ingress: the app on the class, and which class owns which route;
# or how each replica builds its app (a function, or the name of the class's method).
APP_ATTR = "__ladle_asgi_app__"
OWNER_ATTR = "__ladle_ingress_owner__"
OWNER_CLASS_ATTR = "__ladle_ingress_class__"
BUILDER_ATTR = "__ladle_asgi_builder__"
LATE_BUILD_METHOD = "__serve_build_asgi_app__"  # Ray Serve's name


# A whole response as its two ASGI messages (start, body).
_Simple = tuple[dict[str, Any], dict[str, Any]]
# Body chunks produced in one loop iteration travel together, up to this much.
_MERGE_BYTES = 64 * 1024


class _Responder:
    """The ASGI ``send`` of a proxied request: forwards messages as stream items.

    The start message waits for the first body so a small response is one item,
    and leaves with it at once (time to first byte); later body chunks sent
    within one loop iteration are merged into one item (the client gets the same
    bytes, in fewer HTTP chunks, never later than the end of that iteration).
    Large bodies travel out of band (shared memory on the local transport).
    """

    __slots__ = ("_sink", "started", "_start", "_chunks", "_size", "_flush_handle",
                 "_blocked", "_loop")

    def __init__(self, sink: ReplySink) -> None:
        self._sink = sink
        self.started = False
        self._start: dict[str, Any] | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._blocked = False
        self._loop = asyncio.get_running_loop()

    async def send(self, message: dict[str, Any]) -> None:
        if self._blocked:
            await self._sink.wait_credit()
            self._blocked = False
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            self.started = True
            return
        if kind != "http.response.body":
            self._emit(message)
            return
        body = message.get("body", b"")
        if message.get("more_body", False):
            if body and self._start is not None and not self._chunks:
                self._emit(message)  # the first body: no waiting
            elif body:
                self._chunks.append(body)
                self._size += len(body)
                if self._size >= _MERGE_BYTES:
                    self._flush()
                elif self._flush_handle is None:
                    self._flush_handle = self._loop.call_soon(self._flush)
            return
        if self._chunks:
            self._chunks.append(body)
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            message = {"type": "http.response.body", "body": body}
        self._cancel_flush()
        self._emit(message)

    def _cancel_flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def _flush(self) -> None:
        self._flush_handle = None
        if self._chunks:
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self._emit({"type": "http.response.body", "body": body, "more_body": True})

    def _emit(self, message: dict[str, Any]) -> None:
        body = message.get("body")
        if body is not None and len(body) >= _OUT_OF_BAND_BYTES:
            message = {**message, "body": OutOfBand(body, as_view=True)}
        item: Any = message
        if self._start is not None:
            item = (self._start, message)
            self._start = None
        if not self._sink.item(item):
            self._blocked = True

    def send_whole(self, start: dict[str, Any], body: dict[str, Any]) -> None:
        """A complete response (start and its only body) as one item, without awaiting."""
        self.started = True
        last_item = getattr(self._sink, "last_item", None)
        if last_item is None or len(body.get("body", b"")) >= _OUT_OF_BAND_BYTES:
            self._start = start
            self._emit(body)
        else:
            # Item and end together, batched with the pass's other answers; the
            # sink's end() that follows is a no-op.
            last_item((start, body))

    async def flush(self) -> None:
        """Send what is still held back (the start of an empty or cut-off response)."""
        self._cancel_flush()
        self._flush()
        if self._start is not None:
            self._emit({"type": "http.response.body", "body": b""})
        if self._blocked:
            await self._sink.wait_credit()
            self._blocked = False


_ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}


def http_scope(packed: tuple[Any, ...]) -> dict[str, Any]:
    """The ASGI scope of a request the proxy packed (``ProxyApp.child_scope``)."""
    (http_version, method, path, raw_path, query_string, headers, client, server, root_path,
     scheme) = packed
    return {"type": "http", "asgi": dict(_ASGI_VERSION), "http_version": http_version,
            "method": method, "scheme": scheme, "path": path, "raw_path": raw_path,
            "query_string": query_string, "headers": headers, "client": client,
            "server": server, "root_path": root_path}


def body_receiver(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """The ASGI ``receive`` of a proxied request: its whole body, then (only when the
    request is cancelled, which ends the wait) a disconnect."""
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # Wait for good: when the client goes away, the request is cancelled.
        await asyncio.get_running_loop().create_future()
        return {"type": "http.disconnect"}

    return receive


async def serve_http(user: UserCallable, packed_scope: tuple[Any, ...], body: bytes,
                     sink: ReplySink, deployment: str, debug: bool) -> None:
    """Answer one HTTP request; errors become 500 (or the error's own status)."""
    scope = http_scope(packed_scope)
    receive = body_receiver(body)
    responder = _Responder(sink)
    try:
        app = user.asgi_app
        if app is not None:
            await app(scope, receive, responder.send)
            await responder.flush()
        else:
            fn, kind, takes_request = user.http_entrypoint()
            args = (request_class()(scope, receive),) if takes_request else ()
            result = await user.call(fn, kind, args, {}, "__call__")
            await _answer_plain(result, scope, receive, responder)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        await _answer_error(exc, responder, deployment, debug)
    sink.end()


async def finish_sync_http(user: UserCallable, scope: dict[str, Any],
                           receive: Callable[[], Awaitable[dict[str, Any]]], result: Any,
                           exc: BaseException | None, sink: ReplySink, deployment: str,
                           debug: bool) -> None:
    """Answer a request whose sync ``__call__`` already ran in a worker thread
    (``sync_http.py``) but whose outcome was not a simple value."""
    responder = _Responder(sink)
    try:
        if exc is not None:
            raise exc
        await _answer_plain(await user.settle_sync(result, "__call__"), scope, receive,
                            responder)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        await _answer_error(error, responder, deployment, debug)
    sink.end()


async def _answer_plain(result: Any, scope: dict[str, Any], receive: Any,
                        responder: _Responder) -> None:
    """A plain deployment's return value as a response: two ready-made messages when
    it is simple, else the Starlette Response for it."""
    simple = simple_response(result)
    if simple is not None:
        responder.send_whole(*simple)
        return
    await to_response(result)(scope, receive, responder.send)
    await responder.flush()


async def _answer_error(exc: Exception, responder: _Responder, deployment: str,
                        debug: bool) -> None:
    status = exc.status_code if isinstance(exc, LadleError) else 500
    logger.error("Request to deployment '%s' failed:\n%s", deployment,
                 "".join(traceback.format_exception(exc)))
    if responder.started:
        raise exc  # headers are out: the proxy can only cut the response short
    text = "".join(traceback.format_exception(exc)) if debug else reason_phrase(status)
    await _send_text(responder, status, text)


_starlette_request: Any = None


def request_class() -> Any:
    global _starlette_request
    if _starlette_request is None:
        from starlette.requests import Request

        _starlette_request = Request
    return _starlette_request


_TEXT = b"text/plain; charset=utf-8"
# Ray Serve answers bytes and None as "text/plain" without a charset (None as an
# empty body), so clients that dispatch on the content type see the same thing.
_RAW = b"text/plain"
_JSON = b"application/json"


def simple_response(result: Any) -> _Simple | None:
    """The two ASGI messages for a plain return value, without building a Response.

    The body and content type Ray Serve answers for the value (str as UTF-8 text,
    bytes and None as "text/plain", JSON for the rest); None when the value needs a
    real Response.
    """
    kind = type(result)
    if kind is str:
        body = result.encode()
        media = _TEXT
    elif kind is bytes:
        body, media = result, _RAW
    elif result is None:
        body, media = b"", _RAW
    elif kind in (dict, list, int, float, bool):
        try:
            body = json.dumps(result, ensure_ascii=False, allow_nan=False, indent=None,
                              separators=(",", ":")).encode()
        except (TypeError, ValueError):
            return None
        media = _JSON
    else:
        return None
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", media)]
    return ({"type": "http.response.start", "status": 200, "headers": headers},
            {"type": "http.response.body", "body": body})


def to_response(result: Any) -> Any:
    """A Starlette Response for what a deployment returned."""
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    if isinstance(result, Response):
        return result
    if isinstance(result, str):
        return PlainTextResponse(result)
    if isinstance(result, bytes | bytearray | memoryview):
        return Response(bytes(result), headers={"content-type": _RAW.decode()})
    try:
        return JSONResponse(result)
    except (TypeError, ValueError):
        from fastapi.encoders import jsonable_encoder

        return JSONResponse(jsonable_encoder(result))


def reason_phrase(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _send_text(responder: _Responder, status: int, text: str) -> None:
    body = text.encode()
    await responder.send({"type": "http.response.start", "status": status,
                          "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                      (b"content-length", str(len(body)).encode())]})
    await responder.send({"type": "http.response.body", "body": body})


async def serve_websocket(user: UserCallable, scope: dict[str, Any], sink: ReplySink) -> None:
    """Run a WebSocket route; the client's messages arrive as the request's inputs."""
    app = user.asgi_app

    async def send(message: dict[str, Any]) -> None:
        if not sink.item(message):
            await sink.wait_credit()

    if app is None:
        await send({"type": "websocket.close", "code": 1000,
                    "reason": "WebSockets need an ingress deployment (@serve.ingress)."})
    else:
        await app(scope, sink.next_input, send)
    sink.end()


def is_ingress_class(cls: Any) -> bool:
    """Whether ``cls`` was decorated with ``@serve.ingress``."""
    return hasattr(cls, APP_ATTR) or hasattr(cls, BUILDER_ATTR)


async def build_ingress_app(instance: Any) -> Any:
    """The ASGI app one replica serves (None if the class has no ingress): its own
    copy of the class's app, or what the class's builder returns."""
    cls = type(instance)
    builder = getattr(cls, BUILDER_ATTR, None)
    if builder is None:
        app = bind_ingress_app(instance)
    else:
        build = getattr(instance, builder) if isinstance(builder, str) else builder
        app = build()
        if inspect.isawaitable(app):
            app = await app
        if app is None or not callable(app):
            raise TypeError(f"The app builder of ingress class '{cls.__name__}' "
                            f"({getattr(build, '__qualname__', build)!r}) must return an ASGI "
                            f"app, got {app!r}.")
    if app is not None:
        _answer_unavailable_with_503(app)
    return app


def _answer_unavailable_with_503(app: Any) -> None:
    """As in Ray Serve, a handle call in a route that fails for want of capacity is a 503
    (the app's own error handling would make it a 500)."""
    handlers = getattr(app, "exception_handlers", None)
    if not isinstance(handlers, dict) or not hasattr(app, "add_exception_handler"):
        return
    from .._core.errors import BackPressureError, DeploymentUnavailableError

    app.exception_handlers = dict(handlers)  # this replica's own, not the shared app's
    for exc_class in (BackPressureError, DeploymentUnavailableError):
        if exc_class not in handlers:  # the user's own handler wins
            app.add_exception_handler(exc_class, _unavailable_response)


def _unavailable_response(request: Any, exc: Exception) -> Any:
    from starlette.responses import PlainTextResponse

    status = getattr(exc, "status_code", 503)
    return PlainTextResponse(str(exc), status_code=status)


def bind_ingress_app(instance: Any) -> Any:
    """The ASGI app for one replica's instance (None if the class has no ingress).

    A private copy of the app whose class-defined routes call this instance (so
    ``self`` works), without the routes of other ingress classes sharing the app.
    """
    cls = type(instance)
    app = getattr(cls, APP_ATTR, None)
    if app is None:
        return None
    owner = getattr(cls, OWNER_CLASS_ATTR, None)
    routes = getattr(app, "routes", None)
    if routes is None or not hasattr(app, "router"):
        return app  # a plain ASGI app: served as is
    bound_routes = []
    for route in routes:
        endpoint: Any = getattr(route, "endpoint", None)
        route_owner = getattr(endpoint, OWNER_ATTR, None)
        if route_owner is None:
            bound_routes.append(route)
        elif route_owner == owner:
            bound_routes.append(_rebind(route, _bind(instance, endpoint)))
    private = copy.copy(app)
    router = private.router = copy.copy(app.router)
    router.routes = bound_routes
    if getattr(getattr(router, "middleware_stack", None), "__self__", None) is app.router:
        # Starlette's Router dispatches through a stack built around its own bound
        # `app` method; point it at the copy, or the original routes would answer.
        router.middleware_stack = router.app
    private.middleware_stack = None
    if hasattr(private, "openapi_schema") and hasattr(private, "setup"):
        # FastAPI's /openapi.json and /docs routes close over the app they were made
        # for: make them again for the copy, so the schema shows the bound routes.
        # In their places: FastAPI adds them first, before routes like "/{name}".
        generated = {getattr(app, attr, None) for attr in
                     ("openapi_url", "docs_url", "redoc_url", "swagger_ui_oauth2_redirect_url")}
        router.routes = []
        private.openapi_schema = None
        private.setup()
        remade = {getattr(r, "path", None): r for r in router.routes}
        router.routes = [remade.get(getattr(r, "path", None), r)
                         if getattr(r, "path", None) in generated else r for r in bound_routes]
    return private


def _bind(instance: Any, endpoint: Any) -> Any:
    """The endpoint as a method of ``instance`` (the class attribute of that name may
    be another route's function: FastAPI allows two routes to share a method name)."""
    bound = getattr(instance, endpoint.__name__, None)
    if bound is endpoint or getattr(bound, "__func__", None) is endpoint:
        return bound  # a staticmethod stays unbound
    return types.MethodType(endpoint, instance)


def _rebind(route: Any, bound_method: Any) -> Any:
    """The same route with ``self`` bound: rebuilt from its own attributes."""
    route_cls = type(route)
    params = inspect.signature(route_cls.__init__).parameters
    kwargs = {}
    for name, param in params.items():
        if name in ("self", "path", "endpoint") or param.kind in (
                param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(route, name):
            kwargs[name] = getattr(route, name)
    if "dependency_overrides_provider" in params and "dependency_overrides_provider" not in kwargs:
        kwargs["dependency_overrides_provider"] = getattr(route, "dependency_overrides_provider",
                                                          None)
    path = getattr(route, "path", None)
    return route_cls(path, bound_method, **kwargs)


class AppLifespan:
    """An ingress app's ASGI lifespan, run as uvicorn runs it (``lifespan="auto"``).

    ``startup`` runs before the replica is ready and raises if the app reports
    a failed startup; an app without lifespan support is served anyway.  The
    state the lifespan yields reaches every request's scope (``request.state``).
    """

    def __init__(self, app: Any) -> None:
        from uvicorn import Config
        from uvicorn.lifespan.on import LifespanOn

        self._lifespan = LifespanOn(Config(app, lifespan="auto", log_config=None,
                                           http="h11", ws="none"))
        self._lifespan.logger = logger

    async def startup(self) -> None:
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError("The ingress app's lifespan startup failed "
                               "(its error is in the replica's log).")

    async def shutdown(self) -> None:
        await self._lifespan.shutdown()

    def serving(self, app: Any) -> Any:
        """``app`` with a copy of the lifespan's state in each request's scope."""
        state = self._lifespan.state

        async def with_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
            scope["state"] = state.copy()
            await app(scope, receive, send)

        return with_state
