"""DeploymentHandle, DeploymentResponse and DeploymentResponseGenerator.

Handles are thin: options plus the router for the caller's event loop.  A
caller inside a running loop uses a router on that loop (no thread hop); a
caller outside any loop hands the request to the background loop and waits
on a ``concurrent.futures.Future``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .._core.context import current_request, new_request_id
from .._core.errors import HandleClosedError, ReplicaDiedError, RequestCancelledError
from .._core.loop import background_loop
from .._core.serialization import snapshot_arguments
from .._core.types import DeploymentID
from .by_reference import ObjectRef, Outcome, reduce_nested
from .router import DONE, QUEUED, Request, Router, router_for
from .streams import STREAM_WINDOW, StreamBuffer

_get_running_loop = asyncio._get_running_loop


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
# Ray's choices for options(request_serialization=/response_serialization=).
_SERIALIZATIONS = frozenset(("cloudpickle", "pickle", "msgpack", "orjson"))


@dataclass(frozen=True, slots=True)
class _HandleOptions:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False


class DeploymentHandle:
    """A handle used to make requests to a deployment at runtime.

    Example:
        .. code-block:: python

            @serve.deployment
            class Ingress:
                def __init__(self, downstream: DeploymentHandle):
                    self._downstream = downstream

                async def __call__(self, name: str) -> str:
                    return await self._downstream.say_hi.remote(name)

    Handles pickle to their deployment's name, so they can be passed to other
    deployments, threads and processes; they work from any thread and loop.
    """

    def __init__(self, deployment_name: str, app_name: str = "default", *,
                 handle_options: _HandleOptions | None = None) -> None:
        self.deployment_id = DeploymentID(deployment_name, app_name)
        self.handle_options = handle_options or _HandleOptions()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._router: Router | None = None

    @property
    def deployment_name(self) -> str:
        return self.deployment_id.name

    @property
    def app_name(self) -> str:
        return self.deployment_id.app_name

    def options(self, *, method_name: Any = DEFAULT, multiplexed_model_id: Any = DEFAULT,
                stream: Any = DEFAULT, session_id: Any = DEFAULT,
                request_serialization: Any = DEFAULT, response_serialization: Any = DEFAULT,
                use_new_handle_api: Any = DEFAULT, _prefer_local_routing: Any = DEFAULT,
                _by_reference: Any = DEFAULT,
                _source: Any = DEFAULT) -> DeploymentHandle:
        """Return a copy of this handle with some options changed.

        ``session_id`` (session stickiness for custom request routers) and the
        ``*_serialization`` choices are accepted as Ray accepts them; ladle's
        router has no session affinity and always pickles.

        Example:
            ``handle.options(method_name="predict", multiplexed_model_id="m1").remote(x)``
        """
        if session_id is not DEFAULT and not isinstance(session_id, str):
            raise TypeError(f"session_id must be a str, got {type(session_id).__name__}")
        for name, value in (("request_serialization", request_serialization),
                            ("response_serialization", response_serialization)):
            if value is not DEFAULT and value not in _SERIALIZATIONS:
                raise ValueError(f"{name} must be one of {sorted(_SERIALIZATIONS)}, "
                                 f"got {value!r}")
        changes: dict[str, Any] = {}
        if method_name is not DEFAULT:
            if not isinstance(method_name, str) or not method_name:
                raise TypeError(f"method_name must be a non-empty str, got {method_name!r}")
            changes["method_name"] = method_name
        if multiplexed_model_id is not DEFAULT:
            if not isinstance(multiplexed_model_id, str):
                raise TypeError("multiplexed_model_id must be a str, "
                                f"got {type(multiplexed_model_id).__name__}")
            changes["multiplexed_model_id"] = multiplexed_model_id
        if stream is not DEFAULT:
            if not isinstance(stream, bool):
                raise TypeError(f"stream must be a bool, got {type(stream).__name__}")
            changes["stream"] = stream
        if _by_reference is not DEFAULT and not isinstance(_by_reference, bool):
            # Ray picks actor calls or gRPC with it; ladle has one data plane, so
            # the choice changes nothing and only its type is checked.
            raise TypeError(f"_by_reference must be a bool, got {type(_by_reference).__name__}")
        clone = DeploymentHandle.__new__(DeploymentHandle)
        clone.deployment_id = self.deployment_id
        clone.handle_options = replace(self.handle_options, **changes)
        clone._loop, clone._router = self._loop, self._router
        return clone

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        """Call the deployment's method; returns at once with a response to await.

        Example:
            ``await handle.remote(1)`` in a loop, ``handle.remote(1).result()`` outside,
            ``handle2.remote(handle1.remote(1))`` to compose without waiting.

        The replica gets the arguments as they were when ``remote`` returned:
        changing an array or a bytearray afterwards does not change what it
        receives (large buffers are copied once, into shared memory the replica
        maps).  What a replica receives is its own to change.
        """
        opts = self.handle_options
        running = _get_running_loop()
        threaded = running is None
        loop = background_loop() if running is None else running
        if loop is self._loop and self._router is not None:
            router = self._router
        else:
            router = router_for(self.deployment_id, loop)
            self._loop, self._router = loop, router
        ctx = current_request()
        if ctx is None:
            meta = (new_request_id(), opts.method_name, opts.multiplexed_model_id, opts.stream, "")
        else:
            meta = (ctx.request_id, opts.method_name, opts.multiplexed_model_id, opts.stream,
                    ctx.route)
        response: DeploymentResponse | DeploymentResponseGenerator
        if opts.stream:
            target: Any = StreamBuffer(loop, STREAM_WINDOW, threaded)
            req = Request(meta, args, kwargs, target, True, STREAM_WINDOW)
            target.request = req
            response = DeploymentResponseGenerator(req, router, loop, threaded)
        else:
            target = concurrent.futures.Future() if threaded else loop.create_future()
            req = Request(meta, args, kwargs, target, False, 0)
            response = DeploymentResponse(req, router, loop, threaded)
        needs_resolving = _check_arguments(args, kwargs)
        if threaded:
            # Sent later, from the background loop: what the replica gets is the
            # arguments as they are now (copy-on-send).
            req.args, req.kwargs = snapshot_arguments(args, kwargs, _ResponseBase)
            loop.call_soon_threadsafe(_start, router, req, response, needs_resolving)
        else:
            _start(router, req, response, needs_resolving)
            if req.state == QUEUED and (args or kwargs):  # waiting for a replica or a value
                req.args, req.kwargs = snapshot_arguments(req.args, req.kwargs, _ResponseBase)
        if ctx is not None and ctx.track_children:
            children = ctx.children
            if children is None:
                children = ctx.children = set()
            _track_child(children, response)
        return response

    def __reduce__(self) -> Any:
        return (_rebuild_handle, (self.deployment_id.name, self.deployment_id.app_name,
                                  self.handle_options))

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self.deployment_name}', app='{self.app_name}')"


def _rebuild_handle(name: str, app: str, options: _HandleOptions) -> DeploymentHandle:
    return DeploymentHandle(name, app, handle_options=options)


def _check_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True if some argument is a DeploymentResponse (or ObjectRef) to resolve first."""
    found = False
    for value in (*args, *kwargs.values()) if kwargs else args:
        if type(value) is ObjectRef:
            found = True
        elif isinstance(value, _ResponseBase):
            if isinstance(value, DeploymentResponseGenerator):
                raise GeneratorCompositionError(
                    "Streaming deployment handle results cannot be passed to downstream "
                    "handle calls: iterate the DeploymentResponseGenerator and pass its "
                    "items instead.")
            found = True
    return found


class GeneratorCompositionError(RuntimeError, TypeError):
    """A DeploymentResponseGenerator passed to ``.remote()``: Ray raises RuntimeError;
    ladle's contract said TypeError, so it is both."""


def _start(router: Router, req: Request, response: _ResponseBase, needs_resolving: bool) -> None:
    if needs_resolving:
        response._resolver = router._loop.create_task(_resolve_then_assign(router, req))
    else:
        router.assign(req)


async def _resolve_then_assign(router: Router, req: Request) -> None:
    try:
        args = tuple([await v if isinstance(v, _RESOLVED) else v for v in req.args])
        kwargs = {k: (await v if isinstance(v, _RESOLVED) else v) for k, v in req.kwargs.items()}
    except asyncio.CancelledError:
        if req.state != DONE:
            req.fail(RequestCancelledError(req.meta[0]))
        raise
    except BaseException as exc:
        # An upstream call failed: this one fails with the same error.
        req.fail(exc)
        return
    if req.state == DONE:
        return
    req.args, req.kwargs = args, kwargs
    router.assign(req)


def _track_child(children: set[Any], response: _ResponseBase) -> None:
    """Remember a call made while serving a request, until it finishes."""
    children.add(response)
    target = response._req.target
    if isinstance(target, StreamBuffer):
        return  # streams are few; the set is dropped with the request
    target.add_done_callback(lambda _: children.discard(response))


class _ResponseBase:
    __slots__ = ("_req", "_router", "_loop", "_threaded", "_cancelled", "_resolver")

    def __init__(self, req: Request, router: Router, loop: asyncio.AbstractEventLoop,
                 threaded: bool) -> None:
        self._req = req
        self._router = router
        self._loop = loop
        self._threaded = threaded
        self._cancelled = False
        self._resolver: asyncio.Task[None] | None = None

    def cancel(self, msg: Any = None) -> bool:
        """Cancel the call: dropped if not yet assigned, else cancelled on the replica.

        The replica cancels every downstream call the request made.  Later
        access to the result raises ``RequestCancelledError``.  (``msg`` and the
        return value, whether this call cancelled it, are asyncio's.)
        """
        if self._cancelled:
            return False
        self._cancelled = True
        if _get_running_loop() is self._loop:
            self._cancel_on_loop()
        else:
            try:
                self._loop.call_soon_threadsafe(self._cancel_on_loop)
            except RuntimeError:
                pass
        return True

    def _cancel_on_loop(self) -> None:
        resolver = self._resolver
        if resolver is not None and not resolver.done():
            resolver.cancel()
        target = self._req.target
        if not self._threaded and isinstance(target, asyncio.Future):
            # Ends cancelled, as asyncio expects of a future it was told to cancel
            # (gather); awaiting it or .result() raise RequestCancelledError.
            target.cancel()
        self._router.cancel(self._req)

    def cancelled(self) -> bool:
        """Whether ``cancel()`` was called (the request may still have completed)."""
        return self._cancelled

    @property
    def request_id(self) -> str:
        """The id of the request: the caller's own when made while serving one."""
        request_id: str = self._req.meta[0]
        return request_id

    @property
    def by_reference(self) -> bool:
        """Ray's flag for responses that can become object references; always True."""
        return True



class DeploymentResponse(_ResponseBase):
    """A future-like object wrapping the result of a unary handle call.

    Example:
        .. code-block:: python

            response = handle.remote("world")
            assert response.result() == "Hello world!"     # outside a loop
            assert await handle.remote("world") == "Hello world!"   # inside one

    It can be passed straight to another ``.remote()`` call; the value is
    resolved before the downstream method runs.

    On the event loop that made it, it is also a future to asyncio (``gather``,
    ``wait``, ``shield`` use it as is, without a task per response): done
    callbacks get the underlying future.
    """

    __slots__ = ()

    # asyncio.isfuture() reads this: not None means "a future of the running loop".
    @property
    def _asyncio_future_blocking(self) -> bool | None:
        if self._threaded or _get_running_loop() is not self._loop:
            return None  # awaited from elsewhere: asyncio wraps __await__ in a task
        return False

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def add_done_callback(self, fn: Any, *, context: Any = None) -> None:
        self._req.target.add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Any) -> int:
        removed: int = self._req.target.remove_done_callback(fn)
        return removed

    def done(self) -> bool:
        return self._is_done()

    def exception(self) -> BaseException | None:
        fut = self._req.target
        if self._threaded:
            return fut.exception(0)  # type: ignore[no-any-return]
        return fut.exception()  # type: ignore[no-any-return]

    def _make_cancelled_error(self) -> asyncio.CancelledError:
        return asyncio.CancelledError()

    def __await__(self) -> Any:
        fut = self._req.target
        loop = _get_running_loop()
        if self._threaded:
            waitable = asyncio.wrap_future(fut)
        elif loop is self._loop:
            waitable = fut
        elif fut.done():  # made in a loop that may have ended since
            return self._finished()
        else:
            try:
                waitable = _bridge_future(fut, self._loop)
            except RuntimeError:  # that loop is closed
                raise HandleClosedError(_LOOP_ENDED) from None
        try:
            return (yield from waitable.__await__())
        except asyncio.CancelledError:
            if self._req.state != DONE or not fut.done():
                self.cancel()
                raise
            if self._cancelled:
                raise RequestCancelledError(self.request_id) from None
            raise

    def _finished(self) -> Any:
        """The outcome of a request that is over, read from any thread."""
        try:
            return _outcome(self._req.target, self.request_id)
        except (ReplicaDiedError, HandleClosedError) as exc:
            # Its connection went with the loop that made it, not with the replica.
            if not self._threaded and self._loop.is_closed():
                raise HandleClosedError(_LOOP_ENDED) from exc
            raise

    def __reduce__(self) -> Any:
        # Nested in another call's arguments: passed by reference (by_reference.py).
        return reduce_nested(self)

    def _on_done(self, callback: Callable[[Outcome], None]) -> None:
        """Call ``callback(outcome)`` once the result is in (on whichever thread)."""
        fut = self._req.target
        request_id = self.request_id

        def deliver(done: Any) -> None:
            try:
                callback((True, _outcome(done, request_id)))
            except Exception as exc:
                callback((False, exc))

        if fut.done():
            deliver(fut)
        elif self._threaded or _get_running_loop() is self._loop:
            fut.add_done_callback(deliver)
        else:
            self._loop.call_soon_threadsafe(fut.add_done_callback, deliver)

    def result(self, *, timeout_s: float | None = None, _skip_asyncio_check: bool = False) -> Any:
        """Block until the result is ready (not from inside an event loop).

        Raises ``TimeoutError`` past ``timeout_s``.
        """
        fut = self._req.target
        if not self._threaded and fut.done():
            # At once, even inside the loop: asyncio (gather, wait_for) reads a finished
            # future so, and expects CancelledError from a cancelled one.  Also when the
            # loop that made it has ended since.
            if fut.cancelled() and _get_running_loop() is not None:
                return fut.result()  # raises CancelledError
            return self._finished()
        if not _skip_asyncio_check and _get_running_loop() is not None:
            raise RuntimeError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `await response` instead.")
        if not self._threaded:
            try:
                fut = _bridge_future(fut, self._loop, threaded=True)
            except RuntimeError:  # that loop is closed
                raise HandleClosedError(_LOOP_ENDED) from None
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if fut.done():
                raise
            raise TimeoutError(f"Timed out after {timeout_s}s waiting for the result.") from None
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(self.request_id) from None

    def _wait_future(self) -> concurrent.futures.Future[Any]:
        """A concurrent future that completes with this response (for ``ladle.wait``)."""
        fut = self._req.target
        if self._threaded:
            return fut  # type: ignore[no-any-return]
        if fut.done():
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            done.set_result(None)
            return done
        return _bridge_future(fut, self._loop, threaded=True)  # type: ignore[no-any-return]

    def _is_done(self) -> bool:
        done: bool = self._req.target.done()
        return done


class DeploymentResponseGenerator(_ResponseBase):
    """The result of a streaming handle call: iterate it with ``for`` or ``async for``.

    Example:
        .. code-block:: python

            gen = handle.options(stream=True).generate.remote(10)
            assert [i for i in gen] == list(range(10))

    Items arrive as the replica produces them; the replica is never more than
    a small window of items ahead of the consumer.
    """

    __slots__ = ()

    def __await__(self) -> Any:
        raise TypeError("`DeploymentResponseGenerator` cannot be awaited directly. "
                        "Use `async for` or `await response.__anext__()` instead.")

    def result(self, *, timeout_s: float | None = None,
               _skip_asyncio_check: bool = False) -> Any:
        """Not for streams: raises ``TypeError`` (iterate the generator instead)."""
        raise TypeError("`DeploymentResponseGenerator` doesn't support `.result()`. Use "
                        "iteration instead: `for item in response` (outside deployments) or "
                        "`async for item in response` (inside deployments).")

    def __reduce__(self) -> Any:
        raise GeneratorCompositionError(
            "Streaming deployment handle results cannot be passed to downstream handle "
            "calls: iterate the DeploymentResponseGenerator and pass its items instead.")

    def __aiter__(self) -> DeploymentResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        if self._cancelled:
            raise RequestCancelledError(self.request_id)
        try:
            return await self._req.target.next_async()
        except asyncio.CancelledError:
            self.cancel()
            raise

    def __iter__(self) -> DeploymentResponseGenerator:
        return self

    def _send_input(self, item: Any) -> None:
        """Send a message into the running call (the proxy forwards WebSocket frames)."""
        if _get_running_loop() is self._loop:
            self._router.send_input(self._req, item)
        else:
            self._loop.call_soon_threadsafe(self._router.send_input, self._req, item)

    def __next__(self) -> Any:
        if _get_running_loop() is not None:
            raise RuntimeError("Sync methods should not be called from within an `asyncio` "
                               "event loop. Use `async for` or `await response.__anext__()` "
                               "instead.")
        if self._cancelled:
            raise RequestCancelledError(self.request_id)
        buffer: StreamBuffer = self._req.target
        if buffer._cond is None:
            raise RuntimeError("This generator was created in an event loop; "
                               "iterate it with `async for` in that loop.")
        return buffer.next_sync()


_LOOP_ENDED = (
    "The event loop this request was made in ended before its result arrived: a request "
    "made inside an event loop is sent and answered there. Await it before that loop ends "
    "(Ray Serve's handles keep such requests going), or make it outside any event loop.")


def _outcome(fut: Any, request_id: str) -> Any:
    """The result of a finished asyncio future, read from any thread."""
    if fut.cancelled():
        raise RequestCancelledError(request_id)
    return fut.result()


def _bridge_future(fut: Any, loop: asyncio.AbstractEventLoop, threaded: bool = False) -> Any:
    """A future usable from another loop (or thread) that follows ``fut`` on ``loop``."""
    out: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def copy(src: asyncio.Future[Any]) -> None:
        if src.cancelled():
            out.cancel()
        elif src.exception() is not None:
            out.set_exception(src.exception())
        else:
            out.set_result(src.result())

    loop.call_soon_threadsafe(fut.add_done_callback, copy)
    return out if threaded else asyncio.wrap_future(out)


# Arguments awaited before a call is sent (the top-level ones).
_RESOLVED = (DeploymentResponse, ObjectRef)

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator", "QUEUED"]
