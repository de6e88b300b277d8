"""HTTP requests to a plain deployment whose ``__call__`` is sync, run in one worker thread.

The general path takes two thread wake-ups per request: the loop hands the
call to a worker, and the worker wakes the loop to send the answer.  On a
busy replica the second one is the costlier: the loop wakes, waits for the
GIL, and only then writes.  Here the worker builds the Request, calls the
user and, when the answer is a plain value (text, bytes, JSON), writes it
to the connection itself (``finish_from_thread``); the loop learns that the
request finished later, when it next needs to know (``Replica.reap``).
Anything else (an exception, a ``Response``, an awaitable) goes back to the
loop and is answered there by the general code, so the user sees the same
behaviour either way.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._core import context as _context
from .._core.errors import RequestCancelledError
from .._core.shared_memory import MIN_BYTES
from .asgi import body_receiver, finish_sync_http, http_scope, request_class, simple_response
from .user_code import PLAIN_TYPES

if TYPE_CHECKING:
    from .replica import Replica

# Decides, once per request, whether the worker's answer or a cancellation wins.
_claim_lock = threading.Lock()


class SyncHttpCall:
    """One such request; stands in for its task on the connection (``cancel``)."""

    __slots__ = ("_replica", "_sink", "_packed", "_body", "_debug", "_fn", "_takes_request",
                 "_ctx", "_request", "_claimed", "_task")

    def __init__(self, replica: Replica, sink: Any, packed_scope: tuple[Any, ...], body: bytes,
                 debug: bool, fn: Callable[..., Any], takes_request: bool,
                 ctx: contextvars.Context, request: _context.RequestContext) -> None:
        self._replica = replica
        self._sink = sink
        self._packed = packed_scope
        self._body = body
        self._debug = debug
        self._fn = fn
        self._takes_request = takes_request
        self._ctx = ctx
        self._request = request
        self._claimed = False
        self._task: asyncio.Task[None] | None = None

    def _claim(self) -> bool:
        """True for exactly one caller: the worker with an answer, or a cancellation."""
        with _claim_lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def run(self) -> None:
        """In a worker thread."""
        scope = http_scope(self._packed)
        receive = body_receiver(self._body)
        try:
            if self._takes_request:
                result = self._ctx.run(self._fn, request_class()(scope, receive))
            else:
                result = self._ctx.run(self._fn)
        except BaseException as exc:
            self._to_loop(scope, receive, None, exc)
            return
        simple = simple_response(result) if type(result) in PLAIN_TYPES else None
        if simple is None or len(simple[1]["body"]) >= MIN_BYTES:
            # A large body goes from the loop, which lends it in shared memory.
            self._to_loop(scope, receive, result, None)
        elif self._claim():
            self._sink.finish_from_thread(simple)
            self._replica.done_from_thread()

    def _to_loop(self, scope: dict[str, Any], receive: Any, result: Any,
                 exc: BaseException | None) -> None:
        try:
            self._replica.loop.call_soon_threadsafe(self._finish_on_loop, scope, receive,
                                                    result, exc)
        except RuntimeError:
            pass  # the loop is closed: the replica is stopping, nobody waits

    def _finish_on_loop(self, scope: dict[str, Any], receive: Any, result: Any,
                        exc: BaseException | None) -> None:
        if not self._claim():
            return  # cancelled meanwhile: answered and released already
        task = self._replica.loop.create_task(self._finish(scope, receive, result, exc),
                                              context=self._ctx)
        # A callback, not a ``finally``: a task cancelled before its first step never
        # runs its coroutine, and this request's slot is taken already.
        task.add_done_callback(self._finished)
        self._task = task

    async def _finish(self, scope: dict[str, Any], receive: Any, result: Any,
                      exc: BaseException | None) -> None:
        replica = self._replica
        try:
            await finish_sync_http(replica.user_callable, scope, receive, result, exc,
                                   self._sink, replica.spec.deployment_id.name, self._debug)
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            self._sink.error(error)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            self._answer_cancelled(release=False)  # the answer is a no-op if one went out
        self._replica.release()

    def cancel(self) -> None:
        """On the loop: the client went away (or timed out), or the connection died."""
        if self._task is not None:
            self._task.cancel()
        elif self._claim():
            self._answer_cancelled()
        # else the worker's answer went out already

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        """The connection's hook to answer a request cancelled before it started: this
        one always answers its own cancellation."""

    def _answer_cancelled(self, release: bool = True) -> None:
        children, self._request.children = self._request.children, None
        for child in list(children or ()):
            child.cancel()
        self._sink.error(RequestCancelledError(self._request.request_id))
        if release:
            self._replica.release()
