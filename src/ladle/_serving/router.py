"""The Router: sends one deployment's requests, from one event loop, to its replicas.

Not here: resolving ``DeploymentResponse`` arguments (the handle does that
before assigning; nested ones are forwarded by ``by_reference.py`` once the
request is out) and the choice policy itself (``choosers.py``).
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections import deque
from typing import Any

from .._core.errors import (
    BackPressureError,
    DeploymentUnavailableError,
    HandleClosedError,
    ReplicaDiedError,
    RequestCancelledError,
)
from .._core.snapshots import hub
from .._core.transport import Remote, connect
from .._core.types import DeploymentID, DeploymentSnapshot, ReplicaInfo
from .by_reference import forward, register_sender
from .choosers import choose_replica

QUEUED, SENT, DONE = 0, 1, 2
_CONNECT_RETRY_S = 0.1
_CONNECT_ATTEMPTS = 20


class Request:
    """One call on its way: queued in a router, then sent on a replica's connection."""

    __slots__ = ("meta", "args", "kwargs", "target", "stream", "window", "model_id",
                 "state", "slot", "key", "inputs", "nested", "__weakref__")

    def __init__(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                 target: Any, stream: bool, window: int) -> None:
        self.meta = meta
        self.args = args
        self.kwargs = kwargs
        self.target = target  # a Future (unary) or a StreamReceiver (stream)
        self.stream = stream
        self.window = window
        self.model_id: str = meta[2]
        self.state = QUEUED
        self.slot: _Slot | None = None
        self.key = 0
        self.inputs: list[Any] | None = None  # sent into the request before it was assigned
        self.nested: list[Any] | None = None  # responses met serialising the arguments

    def fail(self, exc: BaseException) -> None:
        self.state = DONE
        target = self.target
        if self.stream:
            target.fail(exc)
        elif not target.done():
            target.set_exception(exc)


class _Slot:
    """A replica as one router sees it: its connection and what is in flight there."""

    __slots__ = ("info", "remote", "in_flight", "capacity", "model_ids", "routable", "router")

    def __init__(self, info: ReplicaInfo, router: Router) -> None:
        self.info = info
        self.remote: Remote | None = None
        self.in_flight = 0
        self.capacity = info.max_ongoing_requests
        self.model_ids: set[str] = set(info.multiplexed_model_ids)
        self.routable = False
        self.router = router

    def release(self) -> None:
        self.in_flight -= 1
        router = self.router
        if router._queue:
            router._dispatch()
        elif not self.routable and self.in_flight == 0 and self.remote is not None:
            router._retire(self)


class Router:
    """Routes requests for one deployment from one event loop.

    Replicas come from the controller's pushed snapshots; the router keeps one
    connection per replica with many requests in flight.  A request goes to
    the less loaded of two randomly chosen replicas that have room under
    ``max_ongoing_requests`` (preferring replicas that hold its multiplexed
    model); when none has room it waits in a FIFO queue, and past
    ``max_queued_requests`` waiting requests it fails at once with
    ``BackPressureError``.  A request that never reached a replica which died
    is sent elsewhere; one in flight on it fails with ``ReplicaDiedError``.
    Callers that need a deadline apply their own timeout.
    """

    def __init__(self, deployment_id: DeploymentID, loop: asyncio.AbstractEventLoop) -> None:
        self.deployment_id = deployment_id
        self._loop = loop
        self._slots: dict[str, _Slot] = {}
        self._routable: list[_Slot] = []
        self._queue: deque[Request] = deque()
        self._max_queued = -1
        self._snapshot: DeploymentSnapshot | None = None
        self._closed_error: BaseException | None = hub.closed
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe = hub.subscribe(deployment_id, loop, self._on_snapshot)

    # ---------------------------------------------------------------- requests

    def assign(self, req: Request) -> None:
        """Send ``req`` now if a replica has room, else queue it (on this router's loop)."""
        if not self._queue:
            slot = self._choose(req.model_id)
            if slot is not None:
                self._send(slot, req)
                return
        if self._closed_error is not None:
            req.fail(self._closed_error)
            return
        if self._max_queued != -1 and len(self._queue) >= self._max_queued:
            req.fail(BackPressureError(num_queued_requests=len(self._queue),
                                       max_queued_requests=self._max_queued))
            return
        self._queue.append(req)

    def cancel(self, req: Request) -> None:
        if req.state == QUEUED:
            try:
                self._queue.remove(req)
            except ValueError:
                pass
            req.fail(RequestCancelledError(req.meta[0]))
        elif req.state == SENT:
            req.state = DONE
            slot = req.slot
            if slot is not None and slot.remote is not None:
                slot.remote.cancel(req.key)
            req.fail(RequestCancelledError(req.meta[0]))

    def send_input(self, req: Request, item: Any) -> None:
        """Deliver ``item`` into a running request (queued until it is assigned)."""
        if req.state == SENT and req.slot is not None and req.slot.remote is not None:
            req.slot.remote.send_input(req.key, item)
        elif req.state == QUEUED:
            if req.inputs is None:
                req.inputs = []
            req.inputs.append(item)

    def _send(self, slot: _Slot, req: Request) -> None:
        remote = slot.remote
        assert remote is not None
        slot.in_flight += 1
        req.state = SENT
        req.slot = slot
        try:
            if req.stream:
                req.key = remote.start_stream(req.meta, req.args, req.kwargs, req.target,
                                              slot.release, req.window)
            else:
                req.key = remote.start_unary(req.meta, req.args, req.kwargs, req.target,
                                             slot.release)
        except ReplicaDiedError:
            req.nested = None
            # It never left this process: try another replica.
            slot.in_flight -= 1
            req.state = QUEUED
            self._drop(slot)
            self._queue.appendleft(req)
            self._dispatch()
            return
        except BaseException as exc:
            slot.in_flight -= 1
            req.nested = None
            req.fail(exc)
            return
        if req.nested is not None:  # responses nested in the arguments (by_reference.py)
            found, req.nested = req.nested, None
            forward(found, functools.partial(remote.send_input, req.key), self._loop)
        if req.inputs:
            inputs, req.inputs = req.inputs, None
            for item in inputs:
                remote.send_input(req.key, item)
        if req.model_id:
            slot.model_ids.add(req.model_id)
        # Arguments are not needed any more; don't keep them alive.
        req.args = ()
        req.kwargs = {}

    def _choose(self, model_id: str) -> _Slot | None:
        slot = choose_replica(self._routable, model_id)
        if (slot is not None and model_id and model_id not in slot.model_ids
                and any(model_id in s.model_ids for s in self._slots.values() if not s.routable)):
            # A replica holding the model is still connecting (a new router):
            # wait for it rather than load the model a second time elsewhere.
            return None
        return slot

    def _dispatch(self) -> None:
        queue = self._queue
        while queue:
            slot = self._choose(queue[0].model_id)
            if slot is None:
                return
            self._send(slot, queue.popleft())

    # ------------------------------------------------------------- replica set

    def _on_snapshot(self, snapshot: DeploymentSnapshot) -> None:
        self._snapshot = snapshot
        self._max_queued = snapshot.max_queued_requests
        closed = hub.closed  # serve.shutdown() began: no new request reaches a draining replica
        if closed is not None or not snapshot.exists:
            self._fail_all(closed or DeploymentUnavailableError(
                f"Deployment '{self.deployment_id.name}' in application "
                f"'{self.deployment_id.app_name}' does not exist or was deleted."))
            live = {}
        else:
            self._closed_error = None
            live = {r.replica_id: r for r in snapshot.replicas}
        for replica_id, gone in list(self._slots.items()):
            if replica_id not in live:
                self._drop(gone)
        for replica_id, info in live.items():
            existing = self._slots.get(replica_id)
            if existing is None:
                slot = _Slot(info, self)
                self._slots[replica_id] = slot
                self._spawn(self._connect(slot))
            else:
                existing.info = info
                existing.model_ids.update(info.multiplexed_model_ids)
        self._dispatch()  # requests may have waited for a replica that is gone

    async def _connect(self, slot: _Slot) -> None:
        for _ in range(_CONNECT_ATTEMPTS):
            if self._slots.get(slot.info.replica_id) is not slot:
                return
            try:
                remote = await connect(slot.info.address)
            except OSError:
                await asyncio.sleep(_CONNECT_RETRY_S)
                continue
            if self._slots.get(slot.info.replica_id) is not slot:
                await remote.aclose()
                return
            slot.remote = remote
            slot.routable = True
            self._routable.append(slot)
            remote.add_close_callback(lambda: self._drop(slot))
            self._dispatch()
            return
        self._drop(slot)
        self._dispatch()

    def _drop(self, slot: _Slot) -> None:
        """Stop routing to ``slot``; close its connection once nothing is in flight."""
        if self._slots.get(slot.info.replica_id) is slot:
            del self._slots[slot.info.replica_id]
        if slot.routable:
            slot.routable = False
            self._routable.remove(slot)
        if slot.in_flight == 0 and slot.remote is not None:
            self._retire(slot)

    def _retire(self, slot: _Slot) -> None:
        remote, slot.remote = slot.remote, None
        if remote is not None and not remote.closed:
            self._spawn(remote.aclose())

    def _fail_all(self, exc: BaseException) -> None:
        self._closed_error = exc
        queue, self._queue = self._queue, deque()
        for req in queue:
            req.fail(exc)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self, exc: BaseException | None = None) -> None:
        """Fail what is queued and drop every connection (on this router's loop)."""
        self._unsubscribe()
        self._fail_all(exc or HandleClosedError("The handle's ladle instance was shut down."))
        for slot in list(self._slots.values()):
            self._drop(slot)
        for slot in list(self._routable):
            self._drop(slot)

    async def aclose(self, exc: BaseException | None = None) -> None:
        """``close()``, then wait until every connection is closed (the loop is ending)."""
        remotes = [s.remote for s in self._slots.values() if s.remote is not None]
        self.close(exc)
        await asyncio.gather(*(r.aclose() for r in remotes), *self._tasks,
                             return_exceptions=True)
        await asyncio.sleep(0)  # the transports finish closing on the next iteration

    def statistics(self) -> dict[str, Any]:
        return {"queued": len(self._queue),
                "in_flight": {s.info.replica_id: s.in_flight for s in self._slots.values()}}


register_sender(Router._send.__code__)

# Routers of this process, one per (deployment, event loop).
_routers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[DeploymentID, Router]] = (
    weakref.WeakKeyDictionary())


def router_for(deployment_id: DeploymentID, loop: asyncio.AbstractEventLoop) -> Router:
    per_loop = _routers.get(loop)
    if per_loop is None:
        per_loop = _routers[loop] = {}
        if asyncio._get_running_loop() is loop:
            _close_with_loop(loop, per_loop)
    router = per_loop.get(deployment_id)
    if router is None:
        router = per_loop[deployment_id] = Router(deployment_id, loop)
    return router


def close_routers(exc: BaseException | None = None) -> None:
    """Close every router of this process, each on its own loop."""
    for loop, per_loop in list(_routers.items()):
        routers = list(per_loop.values())
        per_loop.clear()
        for router in routers:
            try:
                loop.call_soon_threadsafe(router.close, exc)
            except RuntimeError:
                pass


# One parked async generator per caller loop: see _close_with_loop.
_loop_hooks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
    weakref.WeakKeyDictionary())


def _close_with_loop(loop: asyncio.AbstractEventLoop,
                     per_loop: dict[DeploymentID, Router]) -> None:
    """Close ``loop``'s routers when the loop ends (``asyncio.run``, pytest-asyncio).

    asyncio has no close hook, but a loop finalizes its live async generators
    (``shutdown_asyncgens``) before closing: a generator parked at its first
    ``yield`` is that hook.  Without it the connections opened on a loop that
    ended stay open until garbage collection (ResourceWarning), and its
    routers, which reference the loop, are never freed.
    """
    async def on_loop_end() -> Any:
        try:
            yield
        finally:
            _loop_hooks.pop(loop, None)
            if _routers.get(loop) is per_loop:
                del _routers[loop]
            routers = list(per_loop.values())
            per_loop.clear()
            for router in routers:
                await router.aclose(HandleClosedError("The event loop of this handle ended."))

    hook = on_loop_end()
    try:
        hook.asend(None).send(None)  # runs to the yield; registers with the loop
    except StopIteration:
        pass
    _loop_hooks[loop] = hook
