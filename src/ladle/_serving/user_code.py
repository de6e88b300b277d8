"""Running user code without blocking the replica's loop.

Async methods run on the loop; sync methods and sync generators run in the
replica's thread pool (with the request's context copied in); generators
of both kinds are driven item by item under the caller's flow control.
What a method is gets worked out once per method name and cached.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .._core.errors import LadleError
from .._core.transport import ReplySink
from .threads import ThreadRunner

SYNC, ASYNC, SYNC_GEN, ASYNC_GEN = range(4)
# Values that are certainly neither awaitable nor generators (checked per call).
PLAIN_TYPES = frozenset((str, bytes, int, float, bool, dict, list, tuple, type(None)))
# Items a sync generator may run ahead of the loop that sends them.
_PUMP_AHEAD = 8


def method_kind(fn: Callable[..., Any]) -> int:
    target = fn
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and callable(fn):
        target = getattr(fn, "__call__", fn)
    # A sync function that must run on the loop and returns an async generator
    # says so with this attribute (a streaming @serve.batch entry point).
    if inspect.isasyncgenfunction(target) or getattr(target, "__ladle_async_generator__", False):
        return ASYNC_GEN
    if inspect.iscoroutinefunction(target):
        return ASYNC
    if inspect.isgeneratorfunction(target):
        return SYNC_GEN
    return SYNC


class UserCallable:
    """The user's object (or function), with its methods resolved once each."""

    def __init__(self, target: Any, is_function: bool, name: str, threads: ThreadRunner) -> None:
        self.target = target
        self._is_function = is_function
        self._name = name
        self._threads = threads
        self._methods: dict[str, tuple[Callable[..., Any], int]] = {}
        # The ASGI app of an ingress deployment, bound to this instance.
        self.asgi_app: Any = None
        # What HTTP requests call on a plain deployment (see http_entrypoint).
        self._http_entrypoint: tuple[Callable[..., Any], int, bool] | None = None

    def label(self, method: str) -> str:
        """How Ray's messages name a method: a function deployment by its function's name."""
        if self._is_function:
            return getattr(self.target, "__name__", method)
        return method

    def method(self, name: str) -> tuple[Callable[..., Any], int]:
        found = self._methods.get(name)
        if found is None:
            found = self._methods[name] = self._resolve(name)
        return found

    def _resolve(self, name: str) -> tuple[Callable[..., Any], int]:
        if self._is_function:
            if name != "__call__":
                raise LadleError(f"Tried to call a method '{name}' that does not exist: "
                                 f"deployment '{self._name}' is a function, which only has "
                                 "`__call__`.")
            fn = self.target
        else:
            fn = getattr(self.target, name, None)
            if fn is None or not callable(fn) or (name.startswith("__") and name != "__call__"):
                available = sorted(
                    n for n in dir(type(self.target))
                    if callable(getattr(self.target, n, None)) and not n.startswith("_"))
                if callable(getattr(self.target, "__call__", None)):
                    available.insert(0, "__call__")
                raise LadleError(f"Tried to call a method '{name}' that does not exist on "
                                 f"deployment '{self._name}'. Available methods: {available}.")
        return fn, method_kind(fn)

    def http_entrypoint(self) -> tuple[Callable[..., Any], int, bool]:
        """``__call__`` as HTTP calls it: ``(fn, kind, takes_request)``.

        Like Ray Serve, an entrypoint declared without parameters is called
        with none; any other gets the ``Request``.  Its signature is read once.
        """
        found = self._http_entrypoint
        if found is None:
            fn, kind = self.method("__call__")
            found = self._http_entrypoint = (fn, kind, _takes_parameters(fn))
        return found

    async def call(self, fn: Callable[..., Any], kind: int, args: tuple[Any, ...],
                   kwargs: dict[str, Any], method: str) -> Any:
        if kind == ASYNC:
            return await fn(*args, **kwargs)
        if kind == SYNC:
            result = await self._threads.run(fn, args, kwargs)
            if type(result) in PLAIN_TYPES:
                return result
            return await self.settle_sync(result, method)
        raise TypeError(returned_generator(self.label(method)))

    async def settle_sync(self, result: Any, method: str) -> Any:
        """What a sync method's return value stands for: an awaitable it returned is
        awaited; a generator is an error (it needs ``stream=True``)."""
        if inspect.isawaitable(result):
            result = await result
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            result.close() if inspect.isgenerator(result) else await result.aclose()
            raise TypeError(returned_generator(self.label(method)))
        return result

    async def run_sync(self, fn: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Any:
        return await self._threads.run(fn, args, kwargs)

    async def stream(self, fn: Callable[..., Any], kind: int, args: tuple[Any, ...],
                     kwargs: dict[str, Any], sink: ReplySink, method: str) -> None:
        if kind == ASYNC_GEN:
            await _send_async_items(fn(*args, **kwargs), sink)
        elif kind == SYNC_GEN:
            await _SyncGeneratorPump(self, fn, args, kwargs).run(sink)
        else:
            # As Ray: a plain method may return a generator (or a coroutine that does).
            result = await (fn(*args, **kwargs) if kind == ASYNC
                            else self._threads.run(fn, args, kwargs))
            if inspect.isawaitable(result):
                result = await result
            if inspect.isasyncgen(result):
                await _send_async_items(result, sink)
            elif inspect.isgenerator(result):
                await _SyncGeneratorPump(self, _itself, (result,), {}).run(sink)
            else:
                raise TypeError(f"Called method '{self.label(method)}' with "
                                "`handle.options(stream=True)` "
                                "but it did not return a generator.")
        sink.end()


def _takes_parameters(fn: Callable[..., Any]) -> bool:
    try:
        return len(inspect.signature(fn).parameters) > 0
    except (TypeError, ValueError):  # no signature to read (some builtins): pass the request
        return True


def returned_generator(method: str) -> str:
    """Ray's words for a generator called without ``stream=True``."""
    return (f"Method '{method}' returned a generator. You must use "
            "`handle.options(stream=True)` to call generators on a deployment.")


def is_generator(value: Any) -> bool:
    return type(value) not in PLAIN_TYPES and (inspect.isgenerator(value)
                                               or inspect.isasyncgen(value))


def _itself(value: Any) -> Any:
    return value


async def _send_async_items(agen: Any, sink: ReplySink) -> None:
    try:
        async for item in agen:
            if not sink.item(item):
                await sink.wait_credit()
    finally:
        await agen.aclose()


class _SyncGeneratorPump:
    """Runs a sync generator in the thread pool, a few items ahead of the sender."""

    def __init__(self, user: UserCallable, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._user = user
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._items: deque[Any] = deque()
        self._cond = threading.Condition()
        self._done = False
        self._stop = False
        self._exc: BaseException | None = None
        self._loop = asyncio.get_running_loop()
        self._wakeup: asyncio.Future[None] | None = None

    def _produce(self) -> None:
        try:
            gen = self._fn(*self._args, **self._kwargs)
            try:
                for item in gen:
                    with self._cond:
                        while len(self._items) >= _PUMP_AHEAD and not self._stop:
                            self._cond.wait()
                        if self._stop:
                            break
                        self._items.append(item)
                        first = len(self._items) == 1
                    if first:
                        self._loop.call_soon_threadsafe(self._wake)
            finally:
                gen.close()
        except BaseException as exc:
            self._exc = exc
        finally:
            with self._cond:
                self._done = True
            try:
                self._loop.call_soon_threadsafe(self._wake)
            except RuntimeError:
                pass

    def _wake(self) -> None:
        waiter = self._wakeup
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, sink: ReplySink) -> None:
        producer = asyncio.ensure_future(self._user.run_sync(self._produce, (), {}))
        try:
            while True:
                with self._cond:
                    batch = list(self._items)
                    self._items.clear()
                    done = self._done
                    self._cond.notify()
                for item in batch:
                    if not sink.item(item):
                        await sink.wait_credit()
                if batch:
                    continue
                if done:
                    break
                self._wakeup = self._loop.create_future()
                with self._cond:
                    ready = bool(self._items) or self._done
                if not ready:
                    await self._wakeup
                self._wakeup = None
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify()
            await asyncio.shield(producer)
        if self._exc is not None:
            raise self._exc
