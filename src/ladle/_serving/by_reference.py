"""DeploymentResponses passed by reference: nested inside another call's arguments.

A response at the top level of ``.remote()``'s arguments is resolved to its
value before the call is sent (handle.py).  Anywhere deeper (in a list, a
dict, any object) it is passed by reference, as Ray Serve documents: the call
goes out at once, and the receiver finds an ``ObjectRef`` in its place.  The
caller forwards the value over the downstream request's own connection (an
input message, ``Remote.send_input``) when it has it; the receiver's
``await ref`` (or ``ladle.get(ref)``) waits for that message.  So it works
across processes with nothing but the data plane the request already uses.

The two ends meet in the pickler: a response pickled while a router serialises
a request (``register_sender``) is noted on that request and pickles as its
position in it; the replica, right after unpickling a request, takes the
references it made (``received``) and binds them to the request
(``RefTable``).  Not here: top-level resolution (handle.py), the transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .._core.errors import LadleError, pack_exception, unpack_exception
from .._core.transport import ReplySink

_get_running_loop = asyncio._get_running_loop

# (ok, value): a response's value, or (False, exception) for its error.
Outcome = tuple[bool, Any]


# Code objects of the functions that serialise requests (Router._send): a
# response pickled under one of them, on the same thread, is nested in that
# request's arguments.  Looked for only when a response is pickled, so a
# request without one pays nothing for this.
_senders: set[Any] = set()
_MAX_DEPTH = 16  # frames between Router._send and __reduce__ (the transport's encoder)


def register_sender(code: Any) -> None:
    """Declare ``code`` a request sender: it has a local ``req`` with a ``nested`` list."""
    _senders.add(code)


def reduce_nested(obj: Any) -> tuple[Any, ...]:
    """``__reduce__`` of a DeploymentResponse or an ObjectRef."""
    frame: FrameType | None = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        if frame.f_code in _senders:
            req = frame.f_locals["req"]
            if req.nested is None:
                req.nested = []
            req.nested.append(obj)
            return (_received_ref, (len(req.nested) - 1,))
        frame = frame.f_back
    raise LadleError(
        f"`{type(obj).__name__}` is not serializable outside a `.remote()` call. Pass it "
        "as an argument of `.remote()` (at the top level it is resolved to its value "
        "first; nested in a list, dict or other object it is passed by reference), or "
        "`await` it first.")


# References unpickled from the request being received.  Requests are unpickled
# only on a replica's event loop thread, which calls start_request right after,
# so one list serves (a thread-local would cost every request a lookup).
received: list[ObjectRef] = []


def _received_ref(index: int) -> ObjectRef:
    ref = ObjectRef(index)
    received.append(ref)
    return ref


def take_received() -> list[ObjectRef]:
    """The references the request just unpickled made (empties the list)."""
    refs = received[:]
    received.clear()
    return refs


@dataclass(frozen=True, slots=True)
class Resolved:
    """The input message that carries a nested response's outcome to the receiver."""

    index: int
    ok: bool
    value: Any  # the value, or (pickled exception, traceback) when not ok


def forward(found: list[Any], send_input: Callable[[Resolved], None],
            loop: asyncio.AbstractEventLoop) -> None:
    """Send each nested response's outcome, when it has one, with ``send_input``
    (called on ``loop``; the transport drops it once the request is over)."""
    for index, obj in enumerate(found):
        def deliver(outcome: Outcome, index: int = index) -> None:
            if _get_running_loop() is loop:
                _send_outcome(send_input, index, outcome)
            else:
                try:
                    loop.call_soon_threadsafe(_send_outcome, send_input, index, outcome)
                except RuntimeError:
                    pass  # the caller's loop has ended, and its request with it
        obj._on_done(deliver)


def _send_outcome(send_input: Callable[[Resolved], None], index: int, outcome: Outcome) -> None:
    ok, value = outcome
    if ok:
        try:
            send_input(Resolved(index, True, value))
            return
        except Exception as exc:
            value = TypeError(f"Could not serialize the value of the DeploymentResponse passed "
                              f"by reference ({type(value).__qualname__}): {exc}")
    send_input(Resolved(index, False, pack_exception(value)))


class ObjectRef:
    """What a receiver finds where the caller nested a ``DeploymentResponse``.

    ``await ref`` (inside the receiver's loop) or ``ladle.get(ref)`` (in a sync
    method) returns the upstream call's value, or raises its error, once the
    caller has it; awaiting again gives the same value.  Passed on in another
    ``.remote()`` call it behaves as a response: resolved first at the top
    level, passed by reference again when nested.  It stands for a value the
    request it arrived with carries: while that request runs it waits for the
    value; afterwards, one that never got it raises ``RayServeException``.

    Example:
        .. code-block:: python

            async def pass_by_reference(self, wrapped: list[ObjectRef]) -> str:
                ...  # start work before the upstream result exists
                return await wrapped[0]
    """

    __slots__ = ("_index", "_loop", "_fut")

    def __init__(self, index: int) -> None:
        self._index = index
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fut: asyncio.Future[Any] | None = None

    def __repr__(self) -> str:
        return f"ObjectRef(argument {self._index} passed by reference)"

    def __reduce__(self) -> Any:
        return reduce_nested(self)

    def _bind(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
        self._loop = loop
        self._fut = loop.create_future()
        return self._fut

    def _bound(self) -> asyncio.Future[Any]:
        if self._fut is None:
            raise LadleError("This ObjectRef did not arrive with a request, so nothing will "
                             "resolve it.")
        return self._fut

    def __await__(self) -> Any:
        fut = self._bound()
        if _get_running_loop() is self._loop:
            # Shielded: cancelling one awaiting task must not cancel the value for others.
            return (yield from asyncio.shield(fut).__await__())
        return (yield from asyncio.wrap_future(self._concurrent()).__await__())

    def result(self, *, timeout_s: float | None = None) -> Any:
        """Block until the value arrives (outside the receiver's event loop)."""
        self._bound()
        if _get_running_loop() is not None:
            raise RuntimeError("Sync methods should not be called from within an `asyncio` "
                               "event loop. Use `await ref` instead.")
        try:
            return self._concurrent().result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"Timed out after {timeout_s}s waiting for the value.") from None

    def _concurrent(self) -> concurrent.futures.Future[Any]:
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def copy(outcome: Outcome) -> None:
            ok, value = outcome
            out.set_result(value) if ok else out.set_exception(value)

        self._on_done(copy)
        return out

    def _on_done(self, callback: Callable[[Outcome], None]) -> None:
        """Call ``callback(outcome)`` once the value is here (on the receiver's loop)."""
        fut = self._bound()
        if fut.done():
            callback(_outcome(fut))
            return

        def add() -> None:
            fut.add_done_callback(lambda f: callback(_outcome(f)))

        if _get_running_loop() is self._loop:
            add()
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(add)

    def _is_done(self) -> bool:
        return self._bound().done()

    def _wait_future(self) -> concurrent.futures.Future[Any]:
        return self._concurrent()


def _outcome(fut: asyncio.Future[Any]) -> Outcome:
    if fut.cancelled():
        return False, LadleError("The value of this ObjectRef was cancelled.")
    exc = fut.exception()
    return (True, fut.result()) if exc is None else (False, exc)


class RefTable:
    """The references one received request carries, and the task that fills them in
    from the request's input messages; owned (started, closed) by that request."""

    def __init__(self, refs: list[ObjectRef], sink: ReplySink) -> None:
        loop = asyncio.get_running_loop()
        self._futures = [ref._bind(loop) for ref in refs]
        self._sink = sink
        self._reader = loop.create_task(self._read())

    async def _read(self) -> None:
        futures = self._futures
        pending = len(futures)
        while pending:
            item = await self._sink.next_input()
            if not isinstance(item, Resolved) or not 0 <= item.index < len(futures):
                continue  # not ours (a request's other inputs are its own business)
            fut = futures[item.index]
            if fut.done():
                continue
            pending -= 1
            if item.ok:
                fut.set_result(item.value)
            else:
                fut.set_exception(unpack_exception(*item.value))

    async def aclose(self) -> None:
        """The request is over: stop reading; refs without a value fail from now on."""
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        for fut in self._futures:
            if not fut.done():
                fut.set_exception(LadleError(
                    "The request that received this ObjectRef finished before the value "
                    "arrived; await it while the request runs."))
                fut.exception()  # nobody may ever look: don't log it as unretrieved
