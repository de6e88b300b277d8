"""The seam between ladle's layers and the backend that carries requests.

A ``Backend`` places processes (replicas) and hands back ``Remote``s: one
connection, on the current event loop, to a replica that can carry many
requests at once.  Routers, the controller and the proxy only ever see these
protocols; sockets, pipes and Ray actors live in ``_backends/``.

Replies flow the other way through a ``ReplySink`` (server side) into a
``StreamReceiver`` or an ``asyncio.Future`` (client side).  Failures arrive
already mapped to ladle's exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

# Called once when a request's slot on a connection is free again (its final
# frame arrived, or the connection died).
DoneCallback = Callable[[], None]


class StreamReceiver(Protocol):
    """Client side of a streaming call: the transport feeds it items in order."""

    def push(self, item: Any) -> None: ...
    def end(self) -> None: ...
    def fail(self, exc: BaseException) -> None: ...


class Remote(Protocol):
    """A connection to one replica (or controller), bound to the loop that opened it.

    ``start_unary``/``start_stream`` must be called on that loop and never block:
    they serialise and queue the request, and return a key used by ``cancel``
    and ``grant``.  ``fut`` gets the result or the mapped exception; the
    ``on_done`` callback fires once the remote side has finished with the
    request (even if the caller cancelled earlier), which is what routers
    count in-flight requests by.
    """

    @property
    def closed(self) -> bool: ...

    def start_unary(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                    fut: asyncio.Future[Any], on_done: DoneCallback | None) -> int: ...

    def start_stream(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                     receiver: StreamReceiver, on_done: DoneCallback | None, window: int) -> int: ...

    def cancel(self, key: int) -> None: ...

    def grant(self, key: int, credit: int) -> None: ...

    def send_input(self, key: int, item: Any) -> None:
        """Deliver ``item`` to the running request ``key`` (its ``next_input``)."""
        ...

    def add_close_callback(self, callback: Callable[[], None]) -> None: ...

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...

    async def aclose(self) -> None: ...


class ReplySink(Protocol):
    """Server side of one request: where a replica sends its answer.

    ``item`` returns False when the consumer's window is full; the producer
    then awaits ``wait_credit`` before sending more.
    """

    def result(self, value: Any) -> None: ...
    def error(self, exc: BaseException) -> None: ...
    def item(self, value: Any) -> bool: ...
    async def wait_credit(self) -> None: ...
    def end(self) -> None: ...
    async def next_input(self) -> Any: ...


class RunningRequest(Protocol):
    """What ``start_request`` returns: the request's task, or what cancels like one."""

    def cancel(self) -> Any: ...
    def add_done_callback(self, fn: Callable[[Any], object]) -> None: ...


class RequestServer(Protocol):
    """What a transport's server calls for each request (the Replica, the Controller)."""

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> RunningRequest | None: ...


class Servable(RequestServer, Protocol):
    """A RequestServer that owns its lifetime: the process serves until ``run`` returns."""

    async def run(self) -> None: ...


class Backend(Protocol):
    """Places processes and connects to them.

    ``spawn`` starts a process that builds ``target()`` (a picklable factory of a
    ``Servable``) and returns its address as soon as it accepts connections;
    readiness of what runs there is the caller's business.  ``on_exit`` is
    called with ``name`` when that process ends, however it ends.
    """

    name: str

    async def spawn(self, target: Callable[[], Servable], *, name: str,
                    on_exit: Callable[[str], None]) -> str: ...

    async def listen(self, server: RequestServer, *, name: str) -> str:
        """Serve ``server`` from this process; return the address others connect to."""
        ...

    async def stop(self, name: str, *, timeout_s: float) -> None: ...

    async def adopt(self, name: str, *, on_exit: Callable[[str], None]) -> str | None:
        """Take over ``name``, spawned by a previous controller of this instance, if it is
        still alive: return its address (``on_exit`` as for ``spawn``), else None."""
        ...

    def pids(self) -> dict[str, int]: ...

    async def aclose(self) -> None: ...


_connectors: dict[str, Callable[[str], Any]] = {}


def register_connector(scheme: str, connect: Callable[[str], Any]) -> None:
    """Teach this process how to open a Remote to addresses of the form ``scheme:...``."""
    _connectors[scheme] = connect


async def connect(address: str) -> Remote:
    scheme = address.partition(":")[0]
    try:
        opener = _connectors[scheme]
    except KeyError:
        raise RuntimeError(f"no transport registered for address {address!r}") from None
    remote: Remote = await opener(address)
    return remote
