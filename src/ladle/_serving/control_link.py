"""A process's line to the controller, for processes that don't host it.

Replicas and proxies learn replica sets and routes from the controller's
pushes: the first time a handle in this process needs a deployment, the
link opens a subscription stream for it and republishes every update into
this process's snapshot hub.  It also answers lookups (``get_app_handle``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Hashable
from typing import Any

from .._core.context import new_request_id
from .._core.loop import running_loop as _running_loop
from .._core.snapshots import hub
from .._core.transport import Remote, connect

# Subscriptions never run out of credit: updates are small and coalesced upstream.
_SUBSCRIPTION_WINDOW = 1 << 30


class _HubFeeder:
    """StreamReceiver that republishes each pushed snapshot into the local hub."""

    def __init__(self, key: Hashable) -> None:
        self._key = key

    def push(self, item: Any) -> None:
        hub.publish(self._key, item)

    def end(self) -> None:
        pass

    def fail(self, exc: BaseException) -> None:
        pass


class ControlLink:
    def __init__(self, address: str, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self._loop = loop
        self._remote: Remote | None = None
        self._connecting: asyncio.Future[Remote] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def fetch(self, key: Hashable) -> None:
        """Hub fetcher: start following ``key`` (callable from any thread)."""
        self._loop.call_soon_threadsafe(self._spawn, self._subscribe(key))

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def remote(self) -> Remote:
        if self._remote is not None and not self._remote.closed:
            return self._remote
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(connect(self.address))
        self._remote = await asyncio.shield(self._connecting)
        return self._remote

    async def _subscribe(self, key: Hashable) -> None:
        remote = await self.remote()
        remote.start_stream((new_request_id(), "subscribe", "", True, ""), (key,), {},
                            _HubFeeder(key), None, _SUBSCRIPTION_WINDOW)

    async def call(self, method: str, *args: Any) -> Any:
        """Call the controller from any loop (hops to the link's loop if needed)."""
        if asyncio.get_running_loop() is self._loop:
            return await (await self.remote()).call(method, *args)
        fut = asyncio.run_coroutine_threadsafe(self._call_here(method, *args), self._loop)
        return await asyncio.wrap_future(fut)

    def call_sync(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        if _running_loop() is self._loop:
            # The reply would arrive on this very loop, which we are about to block
            # (user code calling serve.get_app_handle() in `__init__` or an async
            # method): ask over a private connection from another thread instead.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                return pool.submit(asyncio.run, self._call_once(method, *args)).result(timeout_s)
        fut = asyncio.run_coroutine_threadsafe(self._call_here(method, *args), self._loop)
        return fut.result(timeout_s)

    async def _call_once(self, method: str, *args: Any) -> Any:
        remote = await connect(self.address)
        try:
            return await remote.call(method, *args)
        finally:
            await remote.aclose()

    async def _call_here(self, method: str, *args: Any) -> Any:
        return await (await self.remote()).call(method, *args)


_link: ControlLink | None = None


def install(address: str, loop: asyncio.AbstractEventLoop) -> ControlLink:
    """Make this process follow the controller at ``address``."""
    global _link
    _link = ControlLink(address, loop)
    hub.set_fetcher(_link.fetch)
    return _link


def current_link() -> ControlLink | None:
    return _link
