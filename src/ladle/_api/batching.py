"""Dynamic request batching: ``@serve.batch``.

Concurrent calls to a batched function, each passing one value per
parameter, are gathered: the function runs once with a list per parameter
and every caller gets its own element back (or, for an async generator, its
own stream of elements).  Here live the decorator and the per-owner queue
that cuts batches; replicas and handles know nothing about it.
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
from .._core.errors import LadleError

_ITEM, _ERROR, _END = 0, 1, 2


@dataclass(slots=True)
class _Settings:
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None = None


# Ray's checks and messages (ray/serve/batching.py, 2.60), so the same code fails the same way.
def _check_count(name: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise TypeError(f"{name} must be integer >= 1, got {value}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return value


def _check_concurrency(value: object) -> int:
    if not isinstance(value, int) or value < 1:
        raise TypeError(f"max_concurrent_batches must be an integer >= 1, got {value}")
    return value


def _check_timeout(value: object) -> float:
    if not isinstance(value, (int, float)):
        raise TypeError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    return float(value)


def _check_size_fn(value: object) -> Callable[[list[Any]], int] | None:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(value)}")
    return value


class _Entry:
    """One caller's arguments and the way back to it (a future, or a stream channel).

    ``key`` is what entries sharing a batch must have in common: the
    multiplexed model id and which parameters were passed.  ``limits`` are
    the settings when the entry arrived; a batch follows those of its oldest
    entry, as Ray's fixes them when a batch starts to fill.
    """

    __slots__ = ("arguments", "request", "key", "limits", "arrival", "fut", "channel", "sent",
                 "closed")

    def __init__(self, loop: asyncio.AbstractEventLoop, arguments: dict[str, Any], stream: bool,
                 limits: tuple[int, float]) -> None:
        self.arguments = arguments
        self.request = context.current_request()
        model_id = self.request.multiplexed_model_id if self.request is not None else ""
        self.key = (model_id, tuple(arguments))
        self.limits = limits
        self.arrival = loop.time()
        self.fut: asyncio.Future[Any] = loop.create_future()
        # Streams: see _BatchQueue._run_stream for how far the producer runs ahead.
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
    as soon as nothing is pending or running, cuts batches and runs at most
    ``max_concurrent_batches`` at once, each in a task the flusher waits for.
    A batch is made of the oldest entries sharing a key (model id and passed
    parameters), in arrival order, up to ``max_batch_size`` entries (or, with
    ``batch_size_fn``, as many as fit under it); it goes once it is full (or
    the next entry does not fit), else ``batch_wait_timeout_s`` after its
    oldest entry arrived.  A caller cancelled before its batch is cut is
    dropped from it.  The queue is bound to the event loop of its first caller
    and moves to another loop only while idle.  Pickling it gives a fresh,
    idle queue.
    """

    def __init__(self, fn: Callable[..., Any], settings: _Settings, stream: bool,
                 is_method: bool, wrapped: Callable[..., Any]) -> None:
        self.fn, self.settings, self.stream = fn, settings, stream
        self._is_method, self.wrapped = is_method, wrapped
        self._signature = _batch_signature(wrapped, is_method)
        names = list(self._signature.parameters)
        self._first = names[0] if names else ""
        # One positional parameter, as most batched functions have: no binding needed.
        self._single = (len(names) == 1 and self._signature.parameters[self._first].kind
                        is not inspect.Parameter.KEYWORD_ONLY)
        self._pending: deque[_Entry] = deque()
        self._batches: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        self._taken = asyncio.Event()  # a streaming caller took an element, or left
        self._flusher: asyncio.Task[None] | None = None
        self.entry = _entry_point(self)

    def __reduce__(self) -> Any:
        return (_BatchQueue, (self.fn, replace(self.settings), self.stream, self._is_method,
                              self.wrapped))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        self.settings.max_batch_size = _check_count("max_batch_size", max_batch_size)
        self._changed.set()

    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None:
        self.settings.batch_wait_timeout_s = _check_timeout(batch_wait_timeout_s)
        self._changed.set()

    def get_max_batch_size(self) -> int:
        return self.settings.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.settings.batch_wait_timeout_s

    def put(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Entry:
        if self._single and len(args) == 1 and not kwargs:
            arguments = {self._first: args[0]}
        else:
            try:
                arguments = self._signature.bind(*args, **kwargs).arguments
            except TypeError as exc:
                raise TypeError(f"{self.wrapped.__qualname__}(): {exc}") from None
        settings = self.settings
        size_fn = settings.batch_size_fn
        if size_fn is not None and size_fn([arguments.get(self._first)]) > settings.max_batch_size:
            raise RuntimeError("Size of item is greater than max_batch_size. Please increase the "
                               "max_batch_size or check the implementation of the batch_size_fn.")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._flusher is not None and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError(f"{self.wrapped.__qualname__}() is batching in another event "
                                   "loop; a batch queue serves one loop at a time")
            self._loop, self._flusher, self._changed = loop, None, asyncio.Event()
            self._taken = asyncio.Event()
            self._pending.clear()
            self._batches.clear()
        entry = _Entry(loop, arguments, self.stream,
                       (settings.max_batch_size, settings.batch_wait_timeout_s))
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
            while not entry.channel.empty():
                entry.channel.get_nowait()
            self._taken.set()

    def took(self) -> None:
        """A streaming caller took an element: its batch may produce more."""
        self._taken.set()

    def _cut(self, group: list[_Entry]) -> tuple[list[_Entry], bool]:
        """The batch a group's oldest entries make, and whether it must go now."""
        max_size = group[0].limits[0]
        size_fn = self.settings.batch_size_fn
        if size_fn is None:
            return group[:max_size], len(group) >= max_size
        first = self._first
        items: list[Any] = []
        for taken, entry in enumerate(group):
            items.append(entry.arguments.get(first))
            if taken and size_fn(items) > max_size:
                return group[:taken], True  # the next one does not fit: go now
        return group, size_fn(items) >= max_size

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending or self._batches:
                if (not self._pending
                        or len(self._batches) >= self.settings.max_concurrent_batches):
                    await self._wait_changed(None)
                    continue
                # A full batch of any key goes at once; otherwise the oldest
                # entry's batch goes when its wait is over.
                groups: dict[tuple[str, tuple[str, ...]], list[_Entry]] = {}
                for entry in self._pending:
                    groups.setdefault(entry.key, []).append(entry)
                cuts = [self._cut(group) for group in groups.values()]
                ready = [batch for batch, full in cuts if full]
                if not ready:
                    first = self._pending[0]
                    remaining = first.arrival + first.limits[1] - loop.time()
                    if remaining > 0:
                        await self._wait_changed(None if math.isinf(remaining) else remaining)
                        continue
                    ready = [batch for batch, _ in cuts if batch[0] is first]
                self._start(ready[0])
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
                app_name=first.app_name, route=first.route,
                multiplexed_model_id=batch[0].key[0]))
        assert self._loop is not None
        task = self._loop.create_task(self._run(batch), context=ctx)
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._changed.set()

    def _call(self, batch: list[_Entry]) -> Any:
        """The function called with a list per parameter its callers passed."""
        arguments = {name: [e.arguments[name] for e in batch] for name in batch[0].key[1]}
        bound = inspect.BoundArguments(self._signature, arguments)
        return self.fn(*bound.args, **bound.kwargs)

    async def _run(self, batch: list[_Entry]) -> None:
        try:
            if self.stream:
                await self._run_stream(batch)
            else:
                values = _check_results(await self._call(batch), len(batch))
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
        outputs = self._call(batch)
        try:
            async for output in outputs:
                for entry, value in zip(batch, _check_results(output, len(batch))):
                    # Ray's convention: StopIteration (or StopAsyncIteration) in a
                    # slot ends that caller's stream.
                    if value in _STREAM_ENDS or isinstance(value, _STREAM_ENDS):
                        entry.finish(_END)
                    elif not entry.closed and entry.channel is not None:
                        entry.channel.put_nowait((_ITEM, value))
                # Flow control at the pace of the fastest caller, as far as
                # _STREAM_AHEAD elements: a caller may read its stream to the end
                # before another starts on its own (Ray's callers may), so slower
                # callers' elements wait for them, unbounded, as in Ray.
                while True:
                    open_channels = [e.channel for e in batch
                                     if not e.closed and e.channel is not None]
                    if not open_channels or any(c.qsize() < _STREAM_AHEAD
                                                for c in open_channels):
                        break
                    self._taken.clear()
                    await self._taken.wait()
                if all(entry.closed for entry in batch):
                    break
        finally:
            await outputs.aclose()


_STREAM_ENDS = (StopIteration, StopAsyncIteration)
_STREAM_AHEAD = 8


def _batch_signature(fn: Callable[..., Any], is_method: bool) -> inspect.Signature:
    """What callers pass: the function's parameters, without ``self`` for a method."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    if is_method:
        params = params[1:]
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"@serve.batch: {fn.__qualname__} takes *{param.name}; a batched "
                            "function takes named parameters, each of which gets a list")
    return signature.replace(parameters=params)


def _check_results(results: Any, expected: int) -> list[Any]:
    if isinstance(results, (str, bytes, dict)) or not hasattr(results, "__len__"):
        raise TypeError(f"a batched function must return (or yield) a list, got "
                        f"{type(results).__name__}")
    if len(results) != expected:
        raise LadleError("Batched function doesn't preserve batch size. The input list has "
                         f"length {expected} but the returned list has length {len(results)}.")
    return list(results)


def _entry_point(queue: _BatchQueue) -> _Batched:
    """The callable users call: a real coroutine (or async generator) function."""
    entry_point: Callable[..., Any]
    if queue.stream:
        def stream_entry(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            # Queued at the call, as Ray's: callers may create several streams
            # before reading any of them, and their calls still share a batch.
            return _elements(queue, queue.put(args, kwargs))
        # How the replica knows to call it on its loop and stream what it returns.
        setattr(stream_entry, "__ladle_async_generator__", True)
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
    # Ray's private getters, which its own tests and some user code read.
    setattr(entry_point, "_get_max_batch_size", queue.get_max_batch_size)
    setattr(entry_point, "_get_batch_wait_timeout_s", queue.get_batch_wait_timeout_s)
    return cast(_Batched, entry_point)


async def _elements(queue: _BatchQueue, entry: _Entry) -> AsyncIterator[Any]:
    """One streaming caller's elements, as its batch yields them."""
    assert entry.channel is not None
    try:
        while True:
            kind, value = await entry.channel.get()
            queue.took()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        queue.discard(entry)


class _BatchedMethod:
    """A batched method: each instance gets its own queue (and settings).

    The queue lives in the instance's ``__dict__``, created on first access,
    so the class pickles without runtime state and an instance pickled before
    use carries none either.  Accessing the method on an instance returns a
    coroutine function, like a bound method, with the per-instance setters.
    """

    def __init__(self, fn: Callable[..., Any], settings: _Settings, stream: bool) -> None:
        self._fn, self._settings, self._stream = fn, settings, stream
        _batch_signature(fn, is_method=True)  # refuse *args/**kwargs when the class is made
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
                True, self._fn)
        except AttributeError:
            raise TypeError(f"@serve.batch needs a __dict__ on {type(instance).__name__} "
                            "instances to keep their queue") from None
        return queue.entry

    def __call__(self, instance: object, *args: Any, **kwargs: Any) -> Any:
        return self.__get__(instance)(*args, **kwargs)


class _Batched(Protocol):
    """What ``@serve.batch`` makes: called with one value per parameter, tuned per instance."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def set_max_batch_size(self, max_batch_size: int) -> None: ...
    def set_batch_wait_timeout_s(self, batch_wait_timeout_s: float) -> None: ...


@overload
def batch(_func: Callable[..., Any], /) -> _Batched: ...
@overload
def batch(_func: None = None, /, max_batch_size: int = 10, batch_wait_timeout_s: float = 0.01,
          max_concurrent_batches: int = 1, batch_size_fn: Callable[[list[Any]], int] | None = None,
          ) -> Callable[[Callable[..., Any]], _Batched]: ...


def batch(_func: Callable[..., Any] | None = None, /, max_batch_size: int = 10,
          batch_wait_timeout_s: float = 0.01, max_concurrent_batches: int = 1,
          batch_size_fn: Callable[[list[Any]], int] | None = None) -> Any:
    """Gathers concurrent calls into one call with a list per parameter.

    The decorated ``async def`` (a method or a plain function) takes lists
    and returns a list as long as them; each caller passes one value per
    parameter and gets its own element.  A batch runs once ``max_batch_size``
    calls are queued (or, with ``batch_size_fn``, once that function of the
    calls' first arguments reaches ``max_batch_size``; a call too big alone
    fails with ``RuntimeError``) or ``batch_wait_timeout_s`` has passed since
    its oldest call; if the function raises, or returns a list of the wrong
    length, every caller in the batch gets the error.  An async generator
    yielding lists makes each caller's call an async generator of its own
    elements.  Calls with different multiplexed model ids, or passing
    different parameters, never share a batch.

    Example:
        >>> class Model:
        ...     @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        ...     async def __call__(self, xs: list[int]) -> list[int]:
        ...         return [x * 2 for x in xs]
        >>> # await model(3) == 6; model.__call__.set_max_batch_size(16)
    """
    if _func is not None:
        if not callable(_func):
            raise TypeError("@serve.batch can only be used to decorate functions or methods.")
        if not _is_async(_func):
            raise TypeError("Functions decorated with @serve.batch must be 'async def'")
    settings = _Settings(_check_count("max_batch_size", max_batch_size),
                         _check_timeout(batch_wait_timeout_s),
                         _check_concurrency(max_concurrent_batches),
                         _check_size_fn(batch_size_fn))

    def decorate(fn: Callable[..., Any]) -> _Batched:
        if not callable(fn):
            raise TypeError("@serve.batch can only be used to decorate functions or methods.")
        if not _is_async(fn):
            # Ray accepts a sync function here and fails every call to it.
            raise TypeError("Functions decorated with @serve.batch must be 'async def'")
        stream = inspect.isasyncgenfunction(fn)
        # Accessed through instances, the method's descriptor gives them the
        # setters; to type checkers both kinds look the same.
        if _defined_in_class(fn):
            return cast(_Batched, _BatchedMethod(fn, settings, stream))
        return _BatchQueue(fn, replace(settings), stream, False, fn).entry

    return decorate if _func is None else decorate(_func)


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _defined_in_class(fn: Callable[..., Any]) -> bool:
    """A ``def`` in a class body (``Model.handle``, ``f.<locals>.Model.handle``), as
    opposed to a function of a module or of another function (``f.<locals>.g``).
    The decorator runs while the class body does, so this is all it can see."""
    owner, dot, _ = getattr(fn, "__qualname__", "").rpartition(".")
    return bool(dot) and not owner.endswith("<locals>")
