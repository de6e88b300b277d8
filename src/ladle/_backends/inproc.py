"""The in-process backend behind ``_local_testing_mode=True``.

Replicas and the controller are objects on the background loop of the
calling process; a ``Remote`` hands requests to them directly (hopping
loops when the caller is on another one).  Nothing is pickled, as in Ray
Serve's local testing mode; the semantics above the seam are the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from typing import Any

from .._core.context import new_request_id
from .._core.errors import ReplicaDiedError, RequestCancelledError
from .._core.inbox import Inbox
from .._core.transport import (
    DoneCallback,
    RequestServer,
    Servable,
    StreamReceiver,
    register_connector,
)

# name -> (server, the loop it runs on)
_registry: dict[str, tuple[RequestServer, asyncio.AbstractEventLoop]] = {}


class InprocBackend:
    name = "inproc"
    in_process = True

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._names: set[str] = set()

    async def spawn(self, target: Callable[[], Servable], *, name: str,
                    on_exit: Callable[[str], None]) -> str:
        loop = asyncio.get_running_loop()
        servable = target()
        task = loop.create_task(servable.run())
        _registry[name] = (servable, loop)
        self._tasks[name] = task
        self._names.add(name)

        def exited(_: asyncio.Task[None]) -> None:
            _registry.pop(name, None)
            self._tasks.pop(name, None)
            on_exit(name)

        task.add_done_callback(exited)
        return f"inproc:{name}"

    async def listen(self, server: RequestServer, *, name: str) -> str:
        _registry[name] = (server, asyncio.get_running_loop())
        self._names.add(name)
        return f"inproc:{name}"

    async def stop(self, name: str, *, timeout_s: float) -> None:
        task = self._tasks.get(name)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def adopt(self, name: str, *, on_exit: Callable[[str], None]) -> str | None:
        return None  # nothing outlives the process that ran it

    def pids(self) -> dict[str, int]:
        return {}

    async def aclose(self) -> None:
        for name in list(self._tasks):
            await self.stop(name, timeout_s=0)
        for name in self._names:
            _registry.pop(name, None)


class _Sink:
    """ReplySink that delivers to the caller's future or receiver on the caller's loop."""

    def __init__(self, remote: InprocRemote, key: int, target: Any, on_done: DoneCallback | None,
                 stream: bool, credit: int) -> None:
        self._remote = remote
        self._key = key
        self._target = target
        self._on_done = on_done
        self._stream = stream
        self._credit = credit
        self._credit_event: asyncio.Event | None = None
        self.finished = False
        self.inbox = Inbox()

    async def next_input(self) -> Any:
        return await self.inbox.get()

    def _to_caller(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._remote.loop
        if asyncio._get_running_loop() is loop:
            fn(*args)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _done(self) -> None:
        self._remote._pending.pop(self._key, None)
        if self._on_done is not None:
            self._on_done()

    def _set(self, value: Any, exc: BaseException | None) -> None:
        target = self._target
        if self._stream:
            target.fail(exc) if exc is not None else target.end()
        elif not target.done():
            target.set_exception(exc) if exc is not None else target.set_result(value)
        self._done()

    def result(self, value: Any) -> None:
        if not self.finished:
            self.finished = True
            self._to_caller(self._set, value, None)

    def error(self, exc: BaseException) -> None:
        if not self.finished:
            self.finished = True
            self._to_caller(self._set, None, exc)

    def end(self) -> None:
        if not self.finished:
            self.finished = True
            self._to_caller(self._set, None, None)

    def item(self, value: Any) -> bool:
        self._to_caller(self._target.push, value)
        self._credit -= 1
        return self._credit > 0

    async def wait_credit(self) -> None:
        while self._credit <= 0:
            self._credit_event = asyncio.Event()
            await self._credit_event.wait()

    def add_credit(self, n: int) -> None:
        self._credit += n
        if self._credit_event is not None:
            self._credit_event.set()


class InprocRemote:
    """Remote to a server in this process; bound to the caller's loop."""

    def __init__(self, server: RequestServer, server_loop: asyncio.AbstractEventLoop) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = server
        self._server_loop = server_loop
        self._keys = itertools.count(1)
        self._pending: dict[int, tuple[_Sink, list[Any]]] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _on_server(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._server_loop is self.loop:
            fn(*args)
        else:
            self._server_loop.call_soon_threadsafe(fn, *args)

    def _start(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
               target: Any, on_done: DoneCallback | None, stream: bool, credit: int) -> int:
        if self._closed:
            raise ReplicaDiedError("The in-process replica was stopped.")
        key = next(self._keys)
        sink = _Sink(self, key, target, on_done, stream, credit)
        task_box: list[Any] = [None]
        self._pending[key] = (sink, task_box)

        def begin() -> None:
            task_box[0] = self._server.start_request(meta, args, kwargs, sink)

        self._on_server(begin)
        return key

    def start_unary(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                    fut: asyncio.Future[Any], on_done: DoneCallback | None) -> int:
        return self._start(meta, args, kwargs, fut, on_done, False, 0)

    def start_stream(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                     receiver: StreamReceiver, on_done: DoneCallback | None, window: int) -> int:
        return self._start(meta, args, kwargs, receiver, on_done, True, window)

    def cancel(self, key: int) -> None:
        entry = self._pending.get(key)
        if entry is None:
            return
        sink, task_box = entry

        def cancel_there() -> None:
            task = task_box[0]
            if task is not None:
                task.cancel()
                # A task cancelled before its first step never reaches its own handler.
                task.add_done_callback(lambda _: sink.error(  # no-op if it answered
                    RequestCancelledError()))
            else:
                sink.error(RequestCancelledError())

        self._on_server(cancel_there)

    def grant(self, key: int, credit: int) -> None:
        entry = self._pending.get(key)
        if entry is not None:
            self._on_server(entry[0].add_credit, credit)

    def send_input(self, key: int, item: Any) -> None:
        entry = self._pending.get(key)
        if entry is not None:
            self._on_server(entry[0].inbox.put, item)

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        pass

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fut: asyncio.Future[Any] = self.loop.create_future()
        key = self.start_unary((new_request_id(), method, "", False, ""), args, kwargs, fut, None)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(key)
            raise

    async def aclose(self) -> None:
        self._closed = True


async def _connect(address: str) -> InprocRemote:
    name = address.partition(":")[2]
    try:
        server, loop = _registry[name]
    except KeyError:
        raise ConnectionRefusedError(f"no in-process server named {name!r}") from None
    return InprocRemote(server, loop)


register_connector("inproc", _connect)
