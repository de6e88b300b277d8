"""The control socket: how replicas, proxies, drivers and the CLI talk to a Controller.

Unary calls (lookups, status, deploy, delete, shutdown) and ``subscribe``
streams (every new value of a snapshot key, coalesced).  The socket is a
Unix socket in the instance's private directory: its file mode is the
authentication, so only the instance's user gets here.  Arguments arrive
pickled from those processes; nothing from the REST API comes this way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from .._core.errors import LadleError, RequestCancelledError
from .._core.snapshots import hub
from .._core.transport import ReplySink

if TYPE_CHECKING:
    from .controller import Controller


class ControlServer:
    """Answers other processes (replicas, proxies, the CLI) on the control socket."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._loop = asyncio.get_running_loop()

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> asyncio.Future[Any] | None:
        method = meta[1]
        if method == "subscribe":
            return self._loop.create_task(self._subscribe(args[0], sink))
        return self._loop.create_task(self._unary(method, args, sink))

    async def _unary(self, method: str, args: tuple[Any, ...], sink: ReplySink) -> None:
        c = self._controller
        try:
            await c.wait_open()
            if method == "ingress":
                sink.result(c.ingress(*args))
            elif method == "has_deployment":
                sink.result(c.has_deployment(*args))
            elif method == "status":
                sink.result(c.status())
            elif method == "deploy":
                await c.deploy(args[0])
                sink.result(c.http_port)
            elif method == "delete":
                await c.delete(args[0])
                sink.result(None)
            elif method == "ping":
                sink.result(True)
            elif method == "shutdown":
                sink.result(None)
                await asyncio.sleep(0)
                await c.shutdown()
            else:
                raise LadleError(f"unknown controller method {method!r}")
        except asyncio.CancelledError:
            sink.error(RequestCancelledError(method))
            raise
        except Exception as exc:
            sink.error(exc)

    async def _subscribe(self, key: Hashable, sink: ReplySink) -> None:
        """Stream every new value of ``key``; only the latest matters, so coalesce."""
        latest: list[Any] = []
        changed = asyncio.Event()
        await self._controller.wait_open()

        def on_value(value: Any) -> None:
            latest[:] = [value]
            changed.set()

        initial = self._controller.snapshot_for(key)
        if initial is not None:
            on_value(initial)
        unsubscribe = hub.subscribe(key, self._loop, on_value)
        try:
            while True:
                await changed.wait()
                changed.clear()
                if not sink.item(latest[0]):
                    await sink.wait_credit()
        finally:
            unsubscribe()
