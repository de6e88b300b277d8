"""Versioned publish/watch of control-plane state inside one process.

The controller (or, in a replica, the client that listens to it) publishes
the latest value per key — a ``DeploymentSnapshot`` per ``DeploymentID``, the
``RouteTable`` under ``ROUTES`` — and every subscriber gets each new value on
its own event loop.  Subscribers never poll.  A fetcher is asked once for a
key nobody has published yet, which is how a replica starts listening to the
controller for the deployments its handles call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from typing import Any

from .errors import HandleClosedError

ROUTES = "routes"

Callback = Callable[[Any], None]


class SnapshotHub:
    """Latest value per key, pushed to subscribers on their loops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[Hashable, Any] = {}
        self._subscribers: dict[Hashable, list[tuple[asyncio.AbstractEventLoop, Callback]]] = {}
        self._fetcher: Callable[[Hashable], None] | None = None
        self._fetched: set[Hashable] = set()
        # Why new routers must fail at once: no instance is running in this process.
        self.closed: BaseException | None = HandleClosedError(
            "There is no running ladle instance in this process; call serve.run() first.")

    def set_fetcher(self, fetch: Callable[[Hashable], None] | None) -> None:
        with self._lock:
            self._fetcher = fetch
            self._fetched.clear()

    def get(self, key: Hashable) -> Any:
        return self._values.get(key)

    def publish(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._values[key] = value
            subscribers = list(self._subscribers.get(key, ()))
        self._deliver(key, subscribers, value)

    def subscribe(self, key: Hashable, loop: asyncio.AbstractEventLoop,
                  callback: Callback) -> Callable[[], None]:
        """Call ``callback(value)`` on ``loop`` now (if known) and on every publish."""
        entry = (loop, callback)
        fetch = None
        with self._lock:
            self._subscribers.setdefault(key, []).append(entry)
            value = self._values.get(key)
            if value is None and key not in self._fetched and self._fetcher is not None:
                self._fetched.add(key)
                fetch = self._fetcher
        if value is not None:
            self._deliver(key, [entry], value)
        if fetch is not None:
            fetch(key)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subscribers.get(key)
                if subs and entry in subs:
                    subs.remove(entry)

        return unsubscribe

    def clear(self) -> None:
        """Forget every value (the instance went away); subscribers stay."""
        with self._lock:
            self._values.clear()
            self._fetched.clear()

    def _deliver(self, key: Hashable, subscribers: list[tuple[asyncio.AbstractEventLoop, Callback]],
                 value: Any) -> None:
        dead = []
        for loop, callback in subscribers:
            try:
                loop.call_soon_threadsafe(callback, value)
            except RuntimeError:  # that loop is closed: its router is gone
                dead.append((loop, callback))
        if dead:
            with self._lock:
                subs = self._subscribers.get(key, [])
                for entry in dead:
                    if entry in subs:
                        subs.remove(entry)


hub = SnapshotHub()
