"""Per-request and per-replica context, visible to user code and to handles.

The request context follows a request through its replica: the replica sets
it before running user code (threads for sync methods get a copy), and every
handle call made inside reads it to carry the request id onward and to
register itself as a child, so cancelling the parent cancels the children.
The replica context is process-wide and set once when a replica starts.
"""

from __future__ import annotations

import contextvars
import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .types import ReplicaContext


@dataclass(slots=True)
class RequestContext:
    request_id: str = ""
    route: str = ""
    app_name: str = ""
    multiplexed_model_id: str = ""
    # Responses started while serving this request that are not finished yet:
    # cancelling the request cancels them (see _serving.handle).  Made on first use.
    children: set[Any] | None = None
    # False where nothing would ever cancel the children (the proxy, which
    # cancels its one call directly): saves the bookkeeping per request.
    track_children: bool = True


_request_context: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "ladle_request_context", default=None)
# A contextvar, not a global: in local testing mode several replicas share a process.
_replica_context: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "ladle_replica_context", default=None)


def current_request() -> RequestContext | None:
    return _request_context.get()


def set_request(ctx: RequestContext | None) -> contextvars.Token[RequestContext | None]:
    return _request_context.set(ctx)


def reset_request(token: contextvars.Token[RequestContext | None]) -> None:
    _request_context.reset(token)


def current_replica() -> ReplicaContext | None:
    return _replica_context.get()


def set_replica(ctx: ReplicaContext | None) -> None:
    _replica_context.set(ctx)


def _uuid4_prefix() -> str:
    """The first four groups of a UUID 4 (version and variant bits set), random."""
    digits = os.urandom(10).hex()
    return (f"{digits[:8]}-{digits[8:12]}-4{digits[12:15]}-"
            f"{'89ab'[int(digits[15], 16) & 3]}{digits[16:19]}-")


_id_prefix = _uuid4_prefix()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes: a random per-process prefix and a counter, shaped as
    a UUID 4 string like Ray Serve's request ids (which clients may parse)."""
    return f"{_id_prefix}{next(_id_counter):012x}"


# Multiplexed models loaded in this replica; the replica installs a listener so
# routers can prefer replicas that already hold a model.
_model_ids_listener: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "ladle_model_ids_listener", default=None)


def report_multiplexed_model_ids(model_ids: frozenset[str]) -> None:
    listener = _model_ids_listener.get()
    if listener is not None:
        listener(model_ids)


def set_model_ids_listener(listener: Any) -> None:
    _model_ids_listener.set(listener)


# What the replica awaits as it stops, after the user object's own cleanup:
# multiplexed model caches unload their models (their ``__del__``), as Ray's do.
_stop_hooks: contextvars.ContextVar[list[Callable[[], Awaitable[None]]] | None] = (
    contextvars.ContextVar("ladle_stop_hooks", default=None))


def set_stop_hooks(hooks: list[Callable[[], Awaitable[None]]]) -> None:
    _stop_hooks.set(hooks)


def add_stop_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Await ``hook()`` when this replica stops; outside a replica, nothing."""
    hooks = _stop_hooks.get()
    if hooks is not None:
        hooks.append(hook)
