"""@serve.multiplexed in one event loop: LRU, shared loads, unloading, reports, model ids."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from ladle._api.multiplex import get_multiplexed_model_id, multiplexed
from ladle._core import context


@pytest.fixture
def reports() -> Iterator[list[frozenset[str]]]:
    seen: list[frozenset[str]] = []
    context.set_model_ids_listener(seen.append)
    try:
        yield seen
    finally:
        context.set_model_ids_listener(None)


async def settle() -> None:
    """Lets started tasks run until they block (asyncio runs ready tasks FIFO)."""
    for _ in range(5):
        await asyncio.sleep(0)


class Model:
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


class Loader:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Model:
        self.loads.append(model_id)
        return Model(model_id)


async def test_caches_and_evicts_least_recently_used(reports: list[frozenset[str]]) -> None:
    loader = Loader()
    a = await loader.get_model("a")
    await loader.get_model("b")
    assert await loader.get_model("a") is a  # cached, and now most recently used
    await loader.get_model("c")  # evicts b
    assert await loader.get_model("a") is a
    await loader.get_model("b")  # evicts c (a was used after c)
    assert loader.loads == ["a", "b", "c", "b"]
    assert reports == [
        frozenset({"a"}), frozenset({"a", "b"}),
        frozenset({"a"}), frozenset({"a", "c"}),
        frozenset({"a"}), frozenset({"a", "b"}),
    ]


async def test_concurrent_callers_share_one_load() -> None:
    release = asyncio.Event()
    loads: list[str] = []

    class Slow:
        @multiplexed
        async def get_model(self, model_id: str) -> Model:
            loads.append(model_id)
            await release.wait()
            return Model(model_id)

    slow = Slow()
    callers = [asyncio.create_task(slow.get_model("m")) for _ in range(5)]
    await settle()
    release.set()
    models = await asyncio.gather(*callers)
    assert loads == ["m"]
    assert all(m is models[0] for m in models)


async def test_cancelled_caller_does_not_cancel_shared_load() -> None:
    release = asyncio.Event()

    class Slow:
        @multiplexed
        async def get_model(self, model_id: str) -> Model:
            await release.wait()
            return Model(model_id)

    slow = Slow()
    first = asyncio.create_task(slow.get_model("m"))
    second = asyncio.create_task(slow.get_model("m"))
    await settle()
    first.cancel()
    await settle()
    release.set()
    assert (await second).model_id == "m"
    assert first.cancelled()


async def test_failed_load_reaches_all_callers_and_is_retried() -> None:
    attempts = 0
    release = asyncio.Event()

    @multiplexed
    async def get_model(model_id: str) -> Model:
        nonlocal attempts
        attempts += 1
        await release.wait()
        if attempts == 1:
            raise OSError("storage unavailable")
        return Model(model_id)

    callers = [asyncio.create_task(get_model("m")) for _ in range(3)]
    await settle()
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    assert (await get_model("m")).model_id == "m"
    assert attempts == 2


async def test_async_del_is_awaited_on_eviction(reports: list[frozenset[str]]) -> None:
    unloaded: list[GpuModel] = []

    class GpuModel:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        async def __del__(self) -> None:
            await asyncio.sleep(0)  # only an awaited coroutine gets past this
            unloaded.append(self)

    class Loader1:
        @multiplexed(max_num_models_per_replica=1)
        async def get_model(self, model_id: str) -> GpuModel:
            return GpuModel(model_id)

    try:
        loader = Loader1()
        await loader.get_model("x")
        await loader.get_model("y")
        assert [m.model_id for m in unloaded] == ["x"]
        assert reports == [frozenset({"x"}), frozenset(), frozenset({"y"})]
    finally:
        # Python's own finalizer would call the async __del__ again when the
        # models are collected and leave that coroutine unawaited (a
        # RuntimeWarning): the price of an async __del__, here as in Ray.
        # `unloaded` keeps them alive until the method is gone.
        del GpuModel.__del__


async def test_sync_del_is_called_on_eviction() -> None:
    unloaded: list[str] = []

    class CpuModel:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        def __del__(self) -> None:
            unloaded.append(self.model_id)

    class Loader1:
        @multiplexed(max_num_models_per_replica=1)
        async def get_model(self, model_id: str) -> CpuModel:
            return CpuModel(model_id)

    loader = Loader1()
    kept = await loader.get_model("x")
    await loader.get_model("y")
    assert unloaded == ["x"]
    assert kept.model_id == "x"


async def test_unbounded_cache_never_evicts(reports: list[frozenset[str]]) -> None:
    class Everything:
        @multiplexed(max_num_models_per_replica=-1)
        async def get_model(self, model_id: str) -> Model:
            return Model(model_id)

    loader = Everything()
    ids = [f"m{i}" for i in range(20)]
    for model_id in ids:
        await loader.get_model(model_id)
    assert reports[-1] == frozenset(ids)
    assert len(reports) == 20


async def test_caches_are_per_instance() -> None:
    first, second = Loader(), Loader()
    assert (await first.get_model(model_id="a")) is not (await second.get_model("a"))
    assert first.loads == second.loads == ["a"]


async def test_concurrent_loads_of_different_ids_respect_capacity(
        reports: list[frozenset[str]]) -> None:
    loader = Loader()
    await asyncio.gather(*(loader.get_model(i) for i in "abcd"))
    assert reports[-1] == frozenset({"c", "d"})
    assert all(len(ids) <= 2 for ids in reports)


async def test_bad_model_ids() -> None:
    loader = Loader()
    with pytest.raises(TypeError, match="str"):
        await loader.get_model(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        await loader.get_model("")
    with pytest.raises(TypeError, match="one model id"):
        await loader.get_model("a", "b")  # type: ignore[call-arg]


def test_decoration_time_errors() -> None:
    def sync(self: Any, model_id: str) -> Model:
        return Model(model_id)

    async def loader(self: Any, model_id: str) -> Model:
        return Model(model_id)

    with pytest.raises(TypeError, match="async def"):
        multiplexed(sync)  # type: ignore[type-var]
    for bad in (0, -2):
        with pytest.raises(ValueError, match="max_num_models_per_replica"):
            multiplexed(max_num_models_per_replica=bad)
    wrong: Any
    for wrong in ("3", 1.0, True):
        with pytest.raises(TypeError, match="max_num_models_per_replica"):
            multiplexed(max_num_models_per_replica=wrong)
    assert inspect.iscoroutinefunction(multiplexed(loader))


async def test_get_multiplexed_model_id_reads_the_request_context() -> None:
    assert get_multiplexed_model_id() == ""
    token = context.set_request(context.RequestContext(multiplexed_model_id="m1"))
    try:
        assert get_multiplexed_model_id() == "m1"
    finally:
        context.reset_request(token)
    assert get_multiplexed_model_id() == ""


async def test_loader_sees_the_id_it_loads() -> None:
    class Echo:
        @multiplexed
        async def get_model(self, model_id: str) -> str:
            return get_multiplexed_model_id()

    assert await Echo().get_model("m7") == "m7"


def make_class() -> type:
    """A class defined in a function, so cloudpickle copies it by value."""

    class Loader2:
        def __init__(self) -> None:
            self.loads: list[str] = []

        @multiplexed(max_num_models_per_replica=1)
        async def get_model(self, model_id: str) -> Model:
            self.loads.append(model_id)
            return Model(model_id)

    return Loader2


async def test_class_and_used_instance_pickle_with_cloudpickle() -> None:
    loaded = cloudpickle.loads(cloudpickle.dumps(make_class()))
    loader = loaded()
    m = await loader.get_model("a")
    assert await loader.get_model("a") is m
    again = cloudpickle.loads(cloudpickle.dumps(loader))  # models are not pickled
    await again.get_model("a")
    assert again.loads == ["a", "a"]


async def test_a_stopping_replica_unloads_every_model() -> None:
    # As Ray's replica does on shutdown: every model's __del__ (sync in a thread, or async).
    unloaded: list[str] = []

    class Unloading:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        def __del__(self) -> None:
            unloaded.append(self.model_id)

    class Loader2:
        @multiplexed(max_num_models_per_replica=3)
        async def get_model(self, model_id: str) -> Unloading:
            return Unloading(model_id)

    hooks: list[Any] = []
    context.set_stop_hooks(hooks)
    loader = Loader2()
    kept = [await loader.get_model(i) for i in "abc"]
    assert len(hooks) == 1  # one per cache, on its first use
    for hook in hooks:
        await hook()
    assert unloaded == ["a", "b", "c"]  # least recently used first
    assert [m.model_id for m in kept] == ["a", "b", "c"]
