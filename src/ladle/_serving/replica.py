"""The Replica: one user object serving requests on one event loop.

Transport-agnostic: a backend hands it requests through ``start_request``
and it answers through a ``ReplySink``.  Here: construction from the
shipped spec, ``max_ongoing_requests``, request context, cancellation of
a request and everything it called, the system calls the controller uses
(ready, health, reconfigure, stats, drain).  Not here: sockets, processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from .._core import context as _context
from .._core.errors import LadleError, RequestCancelledError
from .._core.transport import ReplySink, RunningRequest
from .._core.types import SYSTEM_PREFIX, DeploymentID, ReplicaContext, ReplicaStats
from .._core.snapshots import hub
from . import control_link
from .by_reference import RefTable, received, take_received
from .asgi import (
    AppLifespan,
    HTTP_METHOD,
    WEBSOCKET_METHOD,
    build_ingress_app,
    serve_http,
    serve_websocket,
)
from .sync_http import SyncHttpCall
from .threads import ThreadRunner
from .user_code import ASYNC, SYNC, UserCallable, is_generator, returned_generator

logger = logging.getLogger("ladle")

# Up to this max_ongoing_requests, a worker thread answers a sync HTTP call itself
# (sync_http.py): with few slots each request's round trip bounds throughput, and
# that saves the loop a wake-up.  With more, the loop answers in batches, which
# costs less per request (bench/README.md, "A worker thread answers").
_THREAD_ANSWERS_UP_TO = 8
# How long a stopping replica waits for the handle calls its cleanup made.
_CLEANUP_CALLS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything a replica process needs to build and run its user object."""

    deployment_id: DeploymentID
    replica_id: str
    serialized_callable: bytes
    serialized_init: bytes  # cloudpickled (args, kwargs)
    is_function: bool
    max_ongoing_requests: int
    user_config: Any = None
    controller_address: str = ""
    sys_path: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


class Replica:
    """Serves one deployment's requests; the same code under every backend."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self._max_ongoing = spec.max_ongoing_requests
        self._ongoing = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._started = 0  # requests ever admitted: drain watches it for stragglers
        # Requests a worker thread finished on its own (sync_http.py), not yet released:
        # ``reap`` releases them when anything needs an exact count.  Workers wake the
        # loop for it only while something waits for a slot or for idleness (a drain).
        self._done_in_threads: deque[None] = deque()
        self._draining = 0
        # The plain sync __call__ HTTP goes to, (fn, takes_request), once known; False: none.
        self._sync_call: Any = None
        self._user: UserCallable | None = None
        self._threads = ThreadRunner(max(4, spec.max_ongoing_requests + 2), "ladle-replica")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._model_ids: frozenset[str] = frozenset()
        self._lifespan: AppLifespan | None = None
        self._stop_hooks: list[Any] = []
        self._base_context = contextvars.copy_context()

    # ---------------------------------------------------------------- lifecycle

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """Make the loop-bound state, on the loop serving this replica: from ``run``, or
        from the first request if one arrives before ``run`` has taken its first step."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._ready = self._loop.create_future()
            self._stopped = asyncio.Event()
            self._idle = asyncio.Event()
            self._idle.set()
        return self._loop

    def _bind_loop_early(self) -> asyncio.AbstractEventLoop:
        loop = self._bind_loop()
        # In a context of its own: this runs in a transport callback, whose context
        # other replicas of this process (local testing mode) may share.
        contextvars.copy_context().run(self._install_context, None)
        return loop

    async def run(self) -> None:
        """Build the user object, then serve until asked to stop."""
        loop = self._bind_loop()
        assert self._ready is not None and self._stopped is not None
        self._install_context(None)
        if self.spec.controller_address:
            control_link.install(self.spec.controller_address, loop)
            hub.closed = None
        try:
            await self._build()
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._ready.exception()  # retrieved here; the controller reads it via `ready`
        else:
            self._ready.set_result(None)
        try:
            await self._stopped.wait()  # or cancelled: the process was told to stop
        finally:
            if self._lifespan is not None:
                await self._lifespan.shutdown()
            await self._run_stop_hooks()
            self._threads.shutdown()

    async def _build(self) -> None:
        spec = self.spec
        _apply_runtime_env(spec.extras)
        target = cloudpickle.loads(spec.serialized_callable)
        init_args, init_kwargs = cloudpickle.loads(spec.serialized_init)
        if spec.is_function:
            obj = target
        else:
            obj = target(*init_args, **init_kwargs)
            if inspect.isawaitable(obj):  # an async factory
                obj = await obj
        self._user = UserCallable(obj, spec.is_function, spec.deployment_id.name, self._threads)
        app = None if spec.is_function else await build_ingress_app(obj)
        if app is not None:
            lifespan = AppLifespan(app)  # the app's startup and shutdown, as under uvicorn
            await lifespan.startup()
            self._lifespan = lifespan
            self._user.asgi_app = lifespan.serving(app)
        else:
            with contextlib.suppress(LadleError):  # no __call__: each request reports it
                self._user.http_entrypoint()  # its signature, read once here
        self._install_context(obj)
        if spec.user_config is not None:
            await self._reconfigure(spec.user_config)

    async def _run_stop_hooks(self) -> None:
        """Await what asked to run as the replica stops (multiplexed models unload), then
        the handle calls they made: cleanup code often reports with a call it does not
        await (Ray's examples do), which would otherwise die with the process."""
        hooks, self._stop_hooks[:] = list(self._stop_hooks), []
        if not hooks:
            return
        cleanup = _context.RequestContext(app_name=self.spec.deployment_id.app_name)
        token = _context.set_request(cleanup)
        try:
            for hook in hooks:
                try:
                    await hook()
                except Exception:
                    logger.exception("cleanup of deployment '%s' failed",
                                     self.spec.deployment_id.name)
        finally:
            _context.reset_request(token)
        calls = [asyncio.ensure_future(_settle(c)) for c in cleanup.children or ()
                 if inspect.isawaitable(c)]
        if calls:
            await asyncio.wait(calls, timeout=_CLEANUP_CALLS_TIMEOUT_S)
            for call in calls:
                call.cancel()

    def _install_context(self, servable: Any) -> None:
        """Set what user code reads from context, and keep it for request tasks."""
        spec = self.spec
        _context.set_replica(ReplicaContext(
            app_name=spec.deployment_id.app_name, deployment=spec.deployment_id.name,
            replica_tag=spec.replica_id, replica_id=spec.replica_id, servable_object=servable))
        _context.set_model_ids_listener(self._on_model_ids)
        _context.set_stop_hooks(self._stop_hooks)
        self._base_context = contextvars.copy_context()

    def _on_model_ids(self, model_ids: frozenset[str]) -> None:
        self._model_ids = model_ids

    # ----------------------------------------------------------------- requests

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> RunningRequest | None:
        loop = self._loop or self._bind_loop_early()
        # The references its arguments made as they were unpickled (by_reference.py).
        refs = take_received() if received else None
        if type(meta) is not tuple or len(meta) != 5:
            # Checked before a slot is taken: a request that fails past that point
            # without reaching its handler would keep the slot forever.
            raise TypeError(f"malformed request metadata {meta!r:.200}")
        method: str = meta[1]
        if method == HTTP_METHOD and meta[3]:
            call = self._sync_http(meta, args, sink)
            if call is not None:
                return call
        if method.startswith(SYSTEM_PREFIX):
            coro = self._system(method, args, kwargs, sink)
        elif meta[3]:
            coro = self._stream(meta, args, kwargs, sink, refs)
        else:
            coro = self._unary(meta, args, kwargs, sink, refs)
        return loop.create_task(coro, context=self._base_context.copy())

    def _sync_http(self, meta: tuple[Any, ...], args: tuple[Any, ...],
                   sink: ReplySink) -> SyncHttpCall | None:
        """Start an HTTP request in a worker thread from start to finish, when the
        deployment is plain with a sync ``__call__``, the transport lets a worker
        answer, and a slot is free; else None (the general path)."""
        entry = self._sync_call
        if entry is None:
            user = self._user
            if user is None or user.asgi_app is not None:
                return None
            try:
                fn, kind, takes_request = user.http_entrypoint()
            except Exception:
                return None  # the general path reports it
            entry = (fn, takes_request)
            if kind != SYNC or self._max_ongoing > _THREAD_ANSWERS_UP_TO:
                entry = False
            self._sync_call = entry
        if entry is False or not hasattr(sink, "finish_from_thread") or not self._take_free_slot():
            return None
        request = _context.RequestContext(meta[0], meta[4], self.spec.deployment_id.app_name,
                                          meta[2])
        ctx = self._base_context.copy()
        ctx.run(_context.set_request, request)
        call = SyncHttpCall(self, sink, args[0], args[1], args[2], entry[0], entry[1], ctx,
                            request)
        self._threads.submit(call.run)
        return call

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def user_callable(self) -> UserCallable:
        assert self._user is not None
        return self._user

    def done_from_thread(self) -> None:
        """A worker thread answered a request on its own (``sync_http.py``)."""
        self._done_in_threads.append(None)
        # Read after the append; the loop changes these before it reaps: one of the
        # two sees the other, so a finished request is never missed.
        if self._slot_waiters or self._draining:
            try:
                self.loop.call_soon_threadsafe(self.reap)
            except RuntimeError:
                pass  # the loop is closed: the replica is stopping

    def reap(self) -> None:
        """Release the slots of requests that worker threads finished."""
        done = self._done_in_threads
        while done:
            done.popleft()
            self.release()

    def _take_free_slot(self) -> bool:
        """``_acquire`` without a coroutine, when a slot is free (most requests)."""
        if self._done_in_threads:
            self.reap()
        if self._ongoing >= self._max_ongoing or self._slot_waiters:
            return False
        self._started += 1
        self._ongoing += 1
        if self._ongoing == 1:
            self._idle.clear()  # type: ignore[union-attr]
        return True

    async def _acquire(self) -> None:
        """Wait for a slot under ``max_ongoing_requests`` (first come, first served)."""
        if self._take_free_slot():
            return
        waiter = self._loop.create_future()  # type: ignore[union-attr]
        self._slot_waiters.append(waiter)
        self.reap()  # after the append: from now on a worker that finishes wakes the loop
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                try:
                    self._slot_waiters.remove(waiter)
                except ValueError:
                    pass
            raise
        self._started += 1  # the releaser counted us in already

    def release(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next request
                return
        self._ongoing -= 1
        if self._ongoing == 0:
            self._idle.set()  # type: ignore[union-attr]

    async def _unary(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                     sink: ReplySink, refs: list[Any] | None) -> None:
        if not self._take_free_slot():  # a coroutine only when the request must wait
            await self._acquire()
        ctx = _context.RequestContext(meta[0], meta[4], self.spec.deployment_id.app_name, meta[2])
        _context.set_request(ctx)
        table = RefTable(refs, sink) if refs else None
        try:
            user = self._user
            if user is None:
                await self._wait_ready()
                user = self._user
                assert user is not None
            fn, kind = user.method(meta[1])
            if kind == ASYNC:
                value = await fn(*args, **kwargs)
                if is_generator(value):  # an async method that returns a generator
                    raise TypeError(returned_generator(user.label(meta[1])))
            else:
                value = await user.call(fn, kind, args, kwargs, meta[1])
            try:
                sink.result(value)
            except Exception as exc:
                raise TypeError(
                    f"Could not serialize the result of '{meta[1]}' of deployment "
                    f"'{self.spec.deployment_id.name}' ({type(value).__qualname__}): {exc}"
                ) from exc
        except asyncio.CancelledError:
            _cancel_children(ctx)
            sink.error(RequestCancelledError(meta[0]))
            raise
        except BaseException as exc:
            sink.error(exc)
        finally:
            self.release()
            if table is not None:
                await table.aclose()

    async def _stream(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink, refs: list[Any] | None) -> None:
        if not self._take_free_slot():  # a coroutine only when the request must wait
            await self._acquire()
        ctx = _context.RequestContext(meta[0], meta[4], self.spec.deployment_id.app_name, meta[2])
        _context.set_request(ctx)
        table = RefTable(refs, sink) if refs else None
        try:
            if self._user is None:
                await self._wait_ready()
            user = self._user
            assert user is not None
            if meta[1] == HTTP_METHOD:
                # args: scope, body, debug (the proxy's http_options).
                await serve_http(user, args[0], args[1], sink, self.spec.deployment_id.name,
                                 args[2])
            elif meta[1] == WEBSOCKET_METHOD:
                await serve_websocket(user, args[0], sink)
            else:
                fn, kind = user.method(meta[1])
                await user.stream(fn, kind, args, kwargs, sink, meta[1])
        except asyncio.CancelledError:
            _cancel_children(ctx)
            sink.error(RequestCancelledError(meta[0]))
            raise
        except BaseException as exc:
            sink.error(exc)
        finally:
            self.release()
            if table is not None:
                await table.aclose()

    async def _wait_ready(self) -> None:
        assert self._ready is not None
        await asyncio.shield(self._ready)

    # ------------------------------------------------------------- system calls

    async def _system(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> None:
        try:
            handler = getattr(self, "_sys_" + method[len(SYSTEM_PREFIX):].rstrip("_"))
            sink.result(await handler(*args, **kwargs))
        except asyncio.CancelledError:
            sink.error(RequestCancelledError(method))
            raise
        except BaseException as exc:
            sink.error(exc)

    async def _sys_ready(self) -> dict[str, Any]:
        await self._wait_ready()
        return {"pid": os.getpid()}

    async def _sys_health(self) -> bool:
        await self._wait_ready()
        assert self._user is not None
        check = getattr(self._user.target, "check_health", None)
        if check is not None and not self.spec.is_function:
            result = (await check() if inspect.iscoroutinefunction(check)
                      else await self._user.run_sync(check, (), {}))
            if inspect.isawaitable(result):
                await result
        return True

    async def _sys_reconfigure(self, user_config: Any) -> None:
        await self._wait_ready()
        await self._reconfigure(user_config)

    async def _reconfigure(self, user_config: Any) -> None:
        assert self._user is not None
        reconfigure = getattr(self._user.target, "reconfigure", None)
        if reconfigure is None or self.spec.is_function:
            raise TypeError(f"Deployment '{self.spec.deployment_id.name}' has a user_config "
                            "but no `reconfigure(self, user_config)` method.")
        result = (await reconfigure(user_config) if inspect.iscoroutinefunction(reconfigure)
                  else await self._user.run_sync(reconfigure, (user_config,), {}))
        if inspect.isawaitable(result):
            await result

    async def _sys_stats(self) -> ReplicaStats:
        self.reap()
        return ReplicaStats(self._ongoing + len(self._slot_waiters), self._model_ids)

    async def _sys_drain(self, timeout_s: float, quiet_s: float = 0.0) -> int:
        """Wait (up to ``timeout_s``) until no request is in flight, and none has
        started for ``quiet_s``; return how many were still in flight."""
        assert self._idle is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._draining += 1
        self.reap()  # after the count: from now on a worker that finishes wakes the loop
        try:
            while True:
                try:
                    await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    return self._ongoing
                started = self._started
                await asyncio.sleep(max(0.0, min(quiet_s, deadline - loop.time())))
                if self._ongoing == 0 and self._started == started:
                    return 0
                if loop.time() >= deadline:
                    return self._ongoing
        finally:
            self._draining -= 1

    async def _sys_stop(self) -> None:
        assert self._stopped is not None
        self._stopped.set()

    async def _sys_ping(self) -> bool:
        return True


def _apply_runtime_env(extras: dict[str, Any]) -> None:
    """Run where the deploying side imported from: its ``sys_path`` first, its ``cwd``,
    its ``env_vars`` (a config's ``runtime_env``, or a driver of a long-lived instance),
    before the code, which may be pickled by reference, is loaded."""
    os.environ.update(extras.get("env_vars") or {})
    cwd = extras.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    for entry in reversed(extras.get("sys_path") or ()):
        if entry not in sys.path:
            sys.path.insert(0, entry)


async def _settle(call: Any) -> None:
    try:
        await call
    except Exception:
        pass  # the cleanup's own business; the replica is stopping either way


def _cancel_children(ctx: _context.RequestContext) -> None:
    children, ctx.children = ctx.children, None
    for child in list(children or ()):
        child.cancel()
