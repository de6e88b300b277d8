"""A process's line to the controller, for processes that don't host it.

Replicas and proxies learn replica sets and routes from the controller's
pushes: the first time a handle in this process needs a deployment, the
link opens a subscription stream for it and republishes every update into
this process's snapshot hub.  It also answers lookups (``get_app_handle``).

If the connection drops (the controller of a long-lived instance died and
is being restarted), the hub keeps the last values, so routing goes on
unchanged; the link reconnects to the same address and subscribes to every
key again.  A restarted controller opens its socket only once it has its
state back, so the first values after a reconnect are the right ones.
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
# Reconnecting: first try at once, then back off up to this.
_MAX_RECONNECT_DELAY_S = 0.1


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
        self._keys: list[Hashable] = []  # everything this process follows
        self._reconnecting = False
        self.closed = False

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
            self._connecting = asyncio.ensure_future(self._connect())
        self._remote = await asyncio.shield(self._connecting)
        return self._remote

    async def _connect(self) -> Remote:
        remote = await connect(self.address)
        remote.add_close_callback(self._on_lost)
        return remote

    async def _subscribe(self, key: Hashable) -> None:
        if key not in self._keys:
            self._keys.append(key)
        try:
            remote = await self.remote()
            self._start_subscription(remote, key)
        except Exception:
            self._on_lost()  # the controller is away: keep trying

    def _start_subscription(self, remote: Remote, key: Hashable) -> None:
        remote.start_stream((new_request_id(), "subscribe", "", True, ""), (key,), {},
                            _HubFeeder(key), None, _SUBSCRIPTION_WINDOW)

    def _on_lost(self) -> None:
        if not self.closed and self._keys and not self._reconnecting:
            self._reconnecting = True
            self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        delay_s = 0.0
        try:
            while not self.closed:
                await asyncio.sleep(delay_s)
                delay_s = min(max(delay_s * 2, 0.005), _MAX_RECONNECT_DELAY_S)
                try:
                    remote = await self.remote()
                except Exception:
                    continue
                for key in list(self._keys):
                    self._start_subscription(remote, key)
                return
        finally:
            self._reconnecting = False

    def close(self) -> None:
        """Stop following the controller (this process is leaving the instance)."""
        self.closed = True
        remote, self._remote = self._remote, None
        if remote is not None:
            self._spawn(remote.aclose())

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


def uninstall() -> None:
    """Stop following the controller (call on the link's loop's thread or from any)."""
    global _link
    link, _link = _link, None
    hub.set_fetcher(None)
    if link is not None:
        link._loop.call_soon_threadsafe(link.close)


def current_link() -> ControlLink | None:
    return _link
