"""Model multiplexing: ``@serve.multiplexed`` and ``get_multiplexed_model_id``.

A multiplexed loader caches the models it returns, per instance (so per
replica), least recently used first out, up to ``max_num_models_per_replica``.
Concurrent requests for one model share a single load, and every change of the
loaded set is reported through ``_core.context`` so that routers can send a
model's requests where it is loaded.  The routing itself is not here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast, overload

from .._core import context

logger = logging.getLogger(__name__)

_Loader = TypeVar("_Loader", bound=Callable[..., Awaitable[Any]])


def get_multiplexed_model_id() -> str:
    """Returns the multiplexed model id of the current request, or ``""``.

    The id comes from the ``serve_multiplexed_model_id`` HTTP header or from
    ``handle.options(multiplexed_model_id=...)``.  Inside a ``@serve.batch``
    function it is the id shared by every request of the batch.

    Example:
        >>> async def __call__(self, request):
        ...     model = await self.get_model(serve.get_multiplexed_model_id())
    """
    request = context.current_request()
    return request.multiplexed_model_id if request is not None else ""


class _ModelCache:
    """The models one owner (an instance, or a plain function) has loaded.

    Each load runs in a task the cache owns: callers asking for the same id
    share it, and a caller that gives up does not cancel it for the others; the
    task ends once the model is cached or the load failed (every caller waiting
    then gets the error, and nothing is cached).  Before loading, least
    recently used models are evicted until loaded plus loading models fit, so a
    model's memory is released before the next one takes it.  Evicting awaits
    the model's ``__del__`` if it is a coroutine function and calls it if not,
    as Ray Serve does; a replica that stops unloads every model the same way.
    Pickling the cache gives an empty one.
    """

    def __init__(self, load: Callable[[str], Awaitable[Any]], capacity: int) -> None:
        self._load = load
        self._capacity = capacity
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Task[Any]] = {}
        self._hooked = False

    def __reduce__(self) -> Any:
        return (_ModelCache, (self._load, self._capacity))

    async def unload_all(self) -> None:
        while self._models:
            await self._evict_lru()

    async def get(self, model_id: str) -> Any:
        if not self._hooked:
            self._hooked = True
            context.add_stop_hook(self.unload_all)
        if model_id in self._models:
            self._models.move_to_end(model_id)
            return self._models[model_id]
        task = self._loading.get(model_id)
        if task is None:
            # The loader sees the id it loads but no caller's request: it
            # serves them all, so none of them may own what it starts.
            ctx = contextvars.copy_context()
            ctx.run(context.set_request, context.RequestContext(multiplexed_model_id=model_id))
            task = asyncio.get_running_loop().create_task(self._load_and_cache(model_id),
                                                          context=ctx)
            self._loading[model_id] = task
            task.add_done_callback(functools.partial(self._load_done, model_id))
        return await asyncio.shield(task)

    def _load_done(self, model_id: str, task: asyncio.Task[Any]) -> None:
        if self._loading.get(model_id) is task:
            del self._loading[model_id]
        if not task.cancelled():
            task.exception()  # every waiter may have gone: don't log it as unretrieved

    async def _load_and_cache(self, model_id: str) -> Any:
        if self._capacity > 0:
            while self._models and len(self._models) + len(self._loading) > self._capacity:
                await self._evict_lru()
        model = await self._load(model_id)
        # Loaded now, not loading: other loads must not keep room for it twice.
        if self._loading.get(model_id) is asyncio.current_task():
            del self._loading[model_id]
        self._models[model_id] = model
        context.report_multiplexed_model_ids(frozenset(self._models))
        if self._capacity > 0:
            # Loads of other ids that ran alongside this one may have overfilled it.
            while len(self._models) > self._capacity:
                await self._evict_lru()
        return model

    async def _evict_lru(self) -> None:
        model_id, model = self._models.popitem(last=False)
        # Report first: routers stop sending this id here while it unloads.
        context.report_multiplexed_model_ids(frozenset(self._models))
        unload = getattr(model, "__del__", None)
        if unload is None:
            return
        try:
            if inspect.iscoroutinefunction(unload):
                await unload()
            else:
                # In a worker thread, as Ray does: it may block, or wait on a handle call.
                await asyncio.to_thread(unload)
        except Exception:
            logger.exception("unloading multiplexed model %r failed", model_id)


def _model_id(param: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    if len(args) == 1 and not kwargs:
        model_id = args[0]
    elif not args and list(kwargs) == [param]:
        model_id = kwargs[param]
    else:
        raise TypeError(f"a multiplexed loader takes exactly one model id, got {len(args)} "
                        f"positional and {sorted(kwargs)} keyword arguments")
    if not isinstance(model_id, str):
        raise TypeError(f"model_id must be a str, got {type(model_id).__name__}")
    if not model_id:
        raise ValueError("model_id must be a non-empty str")
    return model_id


@overload
def multiplexed(func: _Loader, /) -> _Loader: ...
@overload
def multiplexed(func: None = None, /, *, max_num_models_per_replica: int = 3,
                ) -> Callable[[_Loader], _Loader]: ...


def multiplexed(func: Callable[..., Any] | None = None, /, *,
                max_num_models_per_replica: int = 3) -> Any:
    """Caches the models an async loader returns, per replica, in LRU order.

    Decorate an ``async def`` method (or function) taking one model id;
    ``await self.load(model_id)`` loads the model at most once, even for
    concurrent callers, and keeps up to ``max_num_models_per_replica`` models
    (-1: no limit), unloading the least recently used beyond that.  Give a
    model a ``__del__`` (plain or ``async``) to release its resources.

    Example:
        >>> class Models:
        ...     @serve.multiplexed(max_num_models_per_replica=2)
        ...     async def get_model(self, model_id: str) -> Model:
        ...         return await load_from_storage(model_id)
        ...     async def __call__(self, x: int) -> int:
        ...         model = await self.get_model(serve.get_multiplexed_model_id())
        ...         return model(x)
    """
    capacity = max_num_models_per_replica
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"max_num_models_per_replica must be an int, got {capacity!r}")
    if capacity < 1 and capacity != -1:
        raise ValueError("max_num_models_per_replica must be at least 1, or -1 for no limit, "
                         f"got {capacity}")

    def decorate(fn: _Loader) -> _Loader:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@serve.multiplexed needs an `async def` loader, got {fn!r}")
        positional = [p for p in inspect.signature(fn).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) not in (1, 2):
            raise TypeError(f"@serve.multiplexed: {fn.__qualname__} must take one model id "
                            "(after self, for a method)")
        param = positional[-1].name
        if len(positional) == 1:
            cache = _ModelCache(fn, capacity)

            @functools.wraps(fn)
            async def load_function(*args: Any, **kwargs: Any) -> Any:
                return await cache.get(_model_id(param, args, kwargs))
            return cast(_Loader, load_function)

        # One cache per instance, made on first use and kept in its __dict__.
        key = f"_ladle_model_cache__{fn.__qualname__}"

        @functools.wraps(fn)
        async def load_method(self: Any, *args: Any, **kwargs: Any) -> Any:
            model_id = _model_id(param, args, kwargs)
            try:
                cache = self.__dict__[key]
            except KeyError:
                cache = self.__dict__[key] = _ModelCache(functools.partial(fn, self), capacity)
            except AttributeError:
                raise TypeError(f"@serve.multiplexed needs a __dict__ on "
                                f"{type(self).__name__} instances to keep their models") from None
            return await cache.get(model_id)
        return cast(_Loader, load_method)

    if func is None:
        return decorate
    if not callable(func):
        raise TypeError(f"@serve.multiplexed decorates functions, got {func!r}")
    return decorate(func)
