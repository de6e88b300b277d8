"""The caller's end of a streaming call: a bounded buffer with credit-based flow control.

The transport pushes items on the router's loop; the consumer takes them
either on that loop (``async for``) or from another thread (``for``).  The
consumer hands credit back every half window, so the producer is never
more than ``window`` items ahead of what has been consumed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

STREAM_WINDOW = 32


class StreamBuffer:
    """Implements ``StreamReceiver``; owned by one DeploymentResponseGenerator."""

    __slots__ = ("_items", "_done", "_exc", "_loop", "_waiter", "_cond", "_consumed",
                 "_window", "request", "_router")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int, threaded: bool) -> None:
        self._items: deque[Any] = deque()
        self._done = False
        self._exc: BaseException | None = None
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        # Set when the consumer is a thread other than the loop's.
        self._cond = threading.Condition() if threaded else None
        self._consumed = 0
        self._window = window
        self.request: Any = None  # the router's Request, for granting credit

    # --------------------------------------------------- producer (router's loop)

    def push(self, item: Any) -> None:
        cond = self._cond
        if cond is None:
            self._items.append(item)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            with cond:
                self._items.append(item)
                cond.notify()

    def end(self) -> None:
        self._finish(None)

    def fail(self, exc: BaseException) -> None:
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        cond = self._cond
        if cond is None:
            if not self._done:
                self._exc, self._done = exc, True
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            with cond:
                if not self._done:
                    self._exc, self._done = exc, True
                cond.notify()

    # ------------------------------------------------------------------ consumer

    async def next_async(self) -> Any:
        if self._cond is not None:
            # Created by a sync caller but consumed in a loop: wait in a thread.
            return await asyncio.get_running_loop().run_in_executor(None, self.next_sync, None)
        while True:
            if self._items:
                item = self._items.popleft()
                self._took_one(threaded=False)
                return item
            if self._done:
                if self._exc is not None:
                    raise self._exc
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take_ready(self) -> list[Any]:
        """The items already here, without waiting (consumer on the router's loop)."""
        items = self._items
        if not items:
            return []
        taken = list(items)
        items.clear()
        for _ in taken:
            self._took_one(threaded=False)
        return taken

    def next_sync(self, timeout_s: float | None = None) -> Any:
        cond = self._cond
        assert cond is not None
        with cond:
            while not self._items and not self._done:
                if not cond.wait(timeout_s):
                    raise TimeoutError("Timed out waiting for the next streamed item.")
            if self._items:
                item = self._items.popleft()
            elif self._exc is not None:
                raise self._exc
            else:
                raise StopIteration
        self._took_one(threaded=True)
        return item

    def _took_one(self, threaded: bool) -> None:
        self._consumed += 1
        half = self._window >> 1
        if self._consumed >= half:
            self._consumed = 0
            if threaded:
                self._loop.call_soon_threadsafe(self._grant, half)
            else:
                self._grant(half)

    def _grant(self, n: int) -> None:
        req = self.request
        if req is not None and req.state == 1 and req.slot is not None:
            remote = req.slot.remote
            if remote is not None:
                remote.grant(req.key, n)
