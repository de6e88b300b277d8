"""Worker threads for sync user code, handed work without ``concurrent.futures``.

``loop.run_in_executor`` wraps every call in a concurrent Future chained to an
asyncio Future; for short sync methods that bookkeeping costs several times
the call.  Here a call is one queue put, and its result one
``call_soon_threadsafe``.  Threads start on demand up to a bound and are
daemons: a replica never waits for a stuck user thread to exit.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = None


class ThreadRunner:
    """Runs ``fn(*args, **kwargs)`` in a worker thread; the caller awaits a Future."""

    def __init__(self, max_threads: int, name: str) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_threads = max_threads
        self._name = name
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((loop, fut, contextvars.copy_context(), fn, args, kwargs))
        self._ensure_worker()
        return fut

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` in a worker thread; it reports its own outcome and must not raise."""
        self._queue.put(job)
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self._idle == 0 and len(self._threads) < self._max_threads:
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self._name}-{len(self._threads)}")
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        get = self._queue.get
        lock = self._lock
        while True:
            with lock:
                self._idle += 1
            item = get()
            with lock:
                self._idle -= 1
            if item is _STOP:
                return
            if type(item) is tuple:
                _run_one(*item)
            else:
                item()
            item = None  # don't hold a request's data while idle

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(_STOP)


def _run_one(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any],
             ctx: contextvars.Context, fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
    try:
        result = ctx.run(fn, *args, **kwargs)
    except BaseException as exc:
        _deliver(loop, fut, None, exc)
    else:
        _deliver(loop, fut, result, None)


def _deliver(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any,
             exc: BaseException | None) -> None:
    try:
        loop.call_soon_threadsafe(_settle, fut, result, exc)
    except RuntimeError:
        pass  # the loop is gone: nobody is waiting


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # the caller was cancelled
    if exc is None:
        fut.set_result(result)
    else:
        fut.set_exception(exc)
