"""Dynamic request batching: ``@serve.batch``.

Concurrent calls to a batched function, each passing one item, are gathered
into a list; the function runs once per list and every caller gets its own
element back (or, for an async generator, its own stream of elements).  Here
live the decorator and the per-owner queue that cuts batches; replicas and
handles know nothing about it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, cast, overload

from .._core import context

_ITEM, _ERROR, _END = 0, 1, 2


@dataclass(slots=True)
class _Settings:
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _check_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"batch_wait_timeout_s must be a number, got {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {value}")
    return float(value)


class _Entry:
    """One caller's item and the way back to it (a future, or a stream channel)."""

    __slots__ = ("item", "request", "model_id", "arrival", "fut", "channel", "sent", "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, item: Any, stream: bool) -> None:
        self.item = item
        self.request = context.current_request()
        self.model_id = self.request.multiplexed_model_id if self.request is not None else ""
        self.arrival = loop.time()
        self.fut: asyncio.Future[Any] = loop.create_future()
        # Streams: unbounded, but the producer waits for each element to be
        # taken (Queue.join) before producing the next, so one is in flight.
        self.channel: asyncio.Queue[tuple[int, Any]] | None = asyncio.Queue() if stream else None
        self.sent = False
        self.closed = False

    def finish(self, kind: int, value: Any = None) -> None:
        if self.channel is None:
            if not self.fut.done():
                if kind == _ITEM:
                    self.fut.set_result(value)
                elif isinstance(value, asyncio.CancelledError):
                    self.fut.cancel()
                else:
                    self.fut.set_exception(value)
        elif not self.closed:
            self.closed = True
            self.channel.put_nowait((kind, value))


class _BatchQueue:
    """Cuts batches for one owner: an instance, or a plain function.

    Callers append entries.  One flusher task, started by an entry and exiting
    as soon as nothing is pending or running, cuts a batch of up to
    ``max_batch_size`` entries sharing one multiplexed model id once it is full
    or ``batch_wait_timeout_s`` has passed since its oldest entry, and runs at
    most ``max_concurrent_batches`` at once, each in a task the flusher waits
    for.  A caller cancelled before its batch is cut is dropped from it.  The
    queue is bound to the event loop of its first caller and moves to another
    loop only while idle.  Pickling it gives a fresh, idle queue.
    """

    def __init__(self, fn: Callable[[list[Any]], Any], settings: _Settings, stream: bool,
                 param: str, wrapped: Callable[..., Any]) -> None:
        self.fn, self.settings, self.stream = fn, settings, stream
        self._param, self.wrapped = param, wrapped
        self._pending: deque[_Entry] = deque()
        self._batches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self.entry = _entry_point(self)

    def __reduce__(self) -> Any:
        return (_BatchQueue, (self.fn, replace(self.settings), self.stream, self._param,
                              self.wrapped))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        self.settings.max_batch_size = _check_count("max_batch_size", max_batch_size)
        self._changed.set()

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        self.settings.batch_wait_timeout_s = _check_timeout(batch_wait_timeout_s)
        self._changed.set()

    def put(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
        if len(args) == 1 and not kwargs:
            item = args[0]
        elif not args and list(kwargs) == [self._param]:
            item = kwargs[self._param]
        else:
            raise TypeError(f"{self.wrapped.__qualname__}() takes exactly one item, positional "
                            f"or as {self._param}=..., got {len(args)} positional and "
                            f"{sorted(kwargs)} keyword arguments")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._flusher is not None and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(f"{self.wrapped.__qualname__}() is batching in another event "
                                   "loop; a batch queue serves one loop at a time")
            self._loop, self._flusher, self._changed = loop, None, asyncio.Event()
            self._pending.clear()
            self._batches.clear()
        entry = _Entry(loop, item, self.stream)
        self._pending.append(entry)
        self._changed.set()
        if self._flusher is None:
            # The caller's context (replica, listeners) without its request:
            # batches serve many requests and must not become this one's children.
            ctx = contextvars.copy_context()
            ctx.run(context.set_request, None)
            self._flusher = loop.create_task(self._flush(), context=ctx)
        return entry

    def discard(self, entry: _Entry) -> None:
        """The caller is gone: drop its entry if not yet sent, else ignore its results."""
        if not entry.sent:
            entry.sent = entry.closed = True
            self._pending.remove(entry)
            self._changed.set()
        elif entry.channel is not None:
            entry.closed = True
            while not entry.channel.empty():  # release a producer waiting in join()
                entry.channel.get_nowait()
                entry.channel.task_done()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending or self._batches:
                settings = self.settings
                if not self._pending or len(self._batches) >= settings.max_concurrent_batches:
                    await self._wait_changed(None)
                    continue
                # A full batch of any model id goes at once; otherwise the
                # oldest entry's batch goes when its wait is over.
                groups: dict[str, list[_Entry]] = {}
                for entry in self._pending:
                    groups.setdefault(entry.model_id, []).append(entry)
                ready = [g for g in groups.values() if len(g) >= settings.max_batch_size]
                if not ready:
                    first = self._pending[0]
                    remaining = first.arrival + settings.batch_wait_timeout_s - loop.time()
                    if remaining > 0:
                        await self._wait_changed(None if math.isinf(remaining) else remaining)
                        continue
                    ready = [groups[first.model_id]]
                self._start(ready[0][:settings.max_batch_size])
            # No await between the emptiness check above and this line, so a
            # caller either saw this flusher still running or starts a new one.
            self._flusher = None
        except BaseException:
            self._flusher = None
            for task in self._batches:
                task.cancel()
            while self._pending:
                entry = self._pending.popleft()
                entry.sent = True
                entry.finish(_ERROR, asyncio.CancelledError())
            raise

    async def _wait_changed(self, timeout_s: float | None) -> None:
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._changed.wait()
        except TimeoutError:
            pass

    def _start(self, batch: list[_Entry]) -> None:
        chosen = set(map(id, batch))
        self._pending = deque(e for e in self._pending if id(e) not in chosen)
        for entry in batch:
            entry.sent = True
        # The batch sees a request context of its own: the model id its
        # entries share (get_multiplexed_model_id works inside), no caller's children.
        ctx = contextvars.copy_context()
        first = batch[0].request
        if first is not None:
            ctx.run(context.set_request, context.RequestContext(
                app_name=first.app_name, route=first.route, multiplexed_model_id=batch[0].model_id))
        assert self._loop is not None
        task = self._loop.create_task(self._run(batch), context=ctx)
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._changed.set()

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            if self.stream:
                await self._run_stream(batch)
            else:
                values = _check_results(await self.fn([e.item for e in batch]), len(batch))
                for entry, value in zip(batch, values):
                    entry.finish(_ITEM, value)
        except Exception as exc:
            for entry in batch:
                entry.finish(_ERROR, exc)
        except BaseException:
            for entry in batch:
                entry.finish(_ERROR, asyncio.CancelledError())
            raise
        else:
            for entry in batch:
                entry.finish(_END)  # ends streams; futures are already resolved

    async def _run_stream(self, batch: list[_Entry]) -> None:
        outputs = self.fn([e.item for e in batch])
        try:
            async for output in outputs:
                for entry, value in zip(batch, _check_results(output, len(batch))):
                    # Ray's convention: StopIteration in a slot ends that caller's stream.
                    if value is StopIteration or isinstance(value, StopIteration):
                        entry.finish(_END)
                    elif not entry.closed and entry.channel is not None:
                        entry.channel.put_nowait((_ITEM, value))
                # Flow control: the batch moves at the pace of its slowest caller.
                for entry in batch:
                    if not entry.closed and entry.channel is not None:
                        await entry.channel.join()
                if all(entry.closed for entry in batch):
                    break
        finally:
            await outputs.aclose()


def _check_results(results: Any, expected: int) -> list[Any]:
    if isinstance(results, (str, bytes, dict)) or not hasattr(results, "__len__"):
        raise TypeError(f"a batched function must return (or yield) a list, got "
                        f"{type(results).__name__}")
    if len(results) != expected:
        raise RuntimeError(f"a batched function must return (or yield) one result per input: "
                           f"expected a list of length {expected}, got length {len(results)}")
    return list(results)


def _entry_point(queue: _BatchQueue) -> _Batched:
    """The callable users call: a real coroutine (or async generator) function."""
    entry_point: Callable[..., Any]
    if queue.stream:
        async def stream_entry(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            entry = queue.put(args, kwargs)
            assert entry.channel is not None
            try:
                while True:
                    kind, value = await entry.channel.get()
                    entry.channel.task_done()
                    if kind == _END:
                        return
                    if kind == _ERROR:
                        raise value
                    yield value
            finally:
                queue.discard(entry)
        entry_point = stream_entry
    else:
        async def entry(*args: Any, **kwargs: Any) -> Any:
            item = queue.put(args, kwargs)
            try:
                return await item.fut
            except asyncio.CancelledError:
                queue.discard(item)
                if item.fut.done() and not item.fut.cancelled():
                    item.fut.exception()  # resolved as we were cancelled: mark it seen
                raise
        entry_point = entry
    functools.update_wrapper(entry_point, queue.wrapped)
    # setattr: mypy has no way to type attributes added to a function.
    setattr(entry_point, "set_max_batch_size", queue.set_max_batch_size)
    setattr(entry_point, "set_batch_wait_timeout_s", queue.set_batch_wait_timeout_s)
    return cast(_Batched, entry_point)


class _BatchedMethod:
    """A batched method: each instance gets its own queue (and settings).

    The queue lives in the instance's ``__dict__``, created on first access,
    so the class pickles without runtime state and an instance pickled before
    use carries none either.  Accessing the method on an instance returns a
    coroutine function, like a bound method, with the per-instance setters.
    """

    def __init__(self, fn: Callable[..., Any], settings: _Settings, stream: bool,
                 param: str) -> None:
        self._fn, self._settings, self._stream, self._param = fn, settings, stream, param
        self._key = f"_ladle_batch_queue__{fn.__qualname__}"
        functools.update_wrapper(self, fn)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        try:
            queue = instance.__dict__[self._key]
        except KeyError:
            queue = instance.__dict__[self._key] = _BatchQueue(
                functools.partial(self._fn, instance), replace(self._settings), self._stream,
                self._param, self._fn)
        except AttributeError:
            raise TypeError(f"@serve.batch needs a __dict__ on {type(instance).__name__} "
                            "instances to keep their queue") from None
        return queue.entry

    def __call__(self, instance: object, *args: Any, **kwargs: Any) -> Any:
        return self.__get__(instance)(*args, **kwargs)


class _Batched(Protocol):
    """What ``@serve.batch`` makes: called with one item, tuned per instance."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_max_batch_size(self, max_batch_size: int) -> None: ...
    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None: ...


@overload
def batch(_func: Callable[..., Any], /) -> _Batched: ...
@overload
def batch(_func: None = None, /, *, max_batch_size: int = 10, batch_wait_timeout_s: float = 0.01,
          max_concurrent_batches: int = 1) -> Callable[[Callable[..., Any]], _Batched]: ...


def batch(_func: Callable[..., Any] | None = None, /, *, max_batch_size: int = 10,
          batch_wait_timeout_s: float = 0.01, max_concurrent_batches: int = 1) -> Any:
    """Gathers concurrent calls, one item each, into calls with a list.

    The decorated ``async def`` (a method or a plain function) takes a list
    and returns a list of the same length; callers pass one item and get
    their own element.  A batch runs once ``max_batch_size`` items are queued
    or ``batch_wait_timeout_s`` has passed since the oldest; if the function
    raises, or returns a list of the wrong length, every caller in the batch
    gets the error.  An async generator yielding lists makes each caller's
    call an async generator of its own elements.  Items with different
    multiplexed model ids never share a batch.

    Example:
        >>> class Model:
        ...     @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        ...     async def __call__(self, xs: list[int]) -> list[int]:
        ...         return [x * 2 for x in xs]
        >>> # await model(3) == 6; model.__call__.set_max_batch_size(16)
    """
    settings = _Settings(_check_count("max_batch_size", max_batch_size),
                         _check_timeout(batch_wait_timeout_s),
                         _check_count("max_concurrent_batches", max_concurrent_batches))

    def decorate(fn: Callable[..., Any]) -> _Batched:
        stream = inspect.isasyncgenfunction(fn)
        if not (stream or inspect.iscoroutinefunction(fn)):
            raise TypeError(f"@serve.batch needs an `async def` function or async generator, "
                            f"got {fn!r}")
        positional = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # Accessed through instances, the method's descriptor gives them the
        # setters; to type checkers both kinds look the same.
        if len(positional) == 2:
            return cast(_Batched, _BatchedMethod(fn, settings, stream, positional[1].name))
        if len(positional) == 1:
            return _BatchQueue(fn, replace(settings), stream, positional[0].name, fn).entry
        raise TypeError(f"@serve.batch: {fn.__qualname__} must take one list argument "
                        "(after self, for a method)")

    if _func is None:
        return decorate
    if not callable(_func):
        raise TypeError(f"@serve.batch decorates functions, got {_func!r}")
    return decorate(_func)
