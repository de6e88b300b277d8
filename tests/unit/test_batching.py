"""@serve.batch in one event loop: gathering, splitting, errors, cancellation, pickling."""

from __future__ import annotations

import asyncio
import inspect
import pickle
from collections.abc import Awaitable
from typing import Any

import cloudpickle
import pytest

from ladle._api.batching import batch
from ladle._core import context
from ladle.exceptions import RayServeException

BIG_S = 30.0  # a wait timeout no test reaches: batches fire because they are full


async def gather(*calls: Awaitable[Any]) -> list[Any]:
    """asyncio.gather, typed as the list it returns."""
    return list(await asyncio.gather(*calls))


async def settle() -> None:
    """Lets started tasks run until they block (asyncio runs ready tasks FIFO)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def no_tasks_left() -> None:
    """Waits until only the test's own task remains: batching left nothing running."""
    async with asyncio.timeout(5):
        while len(asyncio.all_tasks()) > 1:
            await asyncio.sleep(0)


class Doubler:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @batch(max_batch_size=4, batch_wait_timeout_s=BIG_S)
    async def handle(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [x * 2 for x in xs]


async def test_concurrent_calls_form_one_batch() -> None:
    d = Doubler()
    results = await asyncio.gather(*(d.handle(i) for i in range(4)))
    assert results == [0, 2, 4, 6]
    assert d.sizes == [4]
    await no_tasks_left()


async def test_keyword_item_and_result_per_caller() -> None:
    d = Doubler()
    results = await gather(d.handle(xs=1), d.handle(2), d.handle(xs=3), d.handle(4))
    assert results == [2, 4, 6, 8]


async def test_timeout_flushes_partial_batch() -> None:
    class Small:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @batch(max_batch_size=10, batch_wait_timeout_s=0.01)
        async def handle(self, xs: list[str]) -> list[str]:
            self.sizes.append(len(xs))
            return [x.upper() for x in xs]

    s = Small()
    async with asyncio.timeout(10):
        assert await gather(s.handle("a"), s.handle("b"), s.handle("c")) == ["A", "B", "C"]
    assert s.sizes == [3]


async def test_max_batch_size_splits() -> None:
    class Split:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        @batch(max_batch_size=3, batch_wait_timeout_s=0.01)
        async def handle(self, xs: list[int]) -> list[int]:
            self.batches.append(xs)
            return xs

    s = Split()
    async with asyncio.timeout(10):
        assert await gather(*(s.handle(i) for i in range(7))) == list(range(7))
    assert s.batches == [[0, 1, 2], [3, 4, 5], [6]]
    await no_tasks_left()


async def test_bare_decorator_and_plain_function() -> None:
    sizes: list[int] = []

    @batch
    async def square(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [x * x for x in xs]

    assert inspect.iscoroutinefunction(square)
    square.set_max_batch_size(3)
    square.set_batch_wait_timeout_s(BIG_S)
    assert await gather(square(1), square(2), square(3)) == [1, 4, 9]
    assert sizes == [3]


async def test_bound_method_is_a_coroutine_function() -> None:
    assert inspect.iscoroutinefunction(Doubler().handle)
    d = Doubler()
    assert await gather(*(Doubler.handle(d, i) for i in range(4))) == [0, 2, 4, 6]


async def test_exception_reaches_every_caller() -> None:
    class Failing:
        @batch(max_batch_size=3, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            raise ValueError(f"bad batch {xs}")

    f = Failing()
    results = await asyncio.gather(*(f.handle(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ValueError) and "bad batch [0, 1, 2]" in str(r) for r in results)
    await no_tasks_left()


async def test_wrong_length_is_ray_serve_exception_for_all() -> None:
    class Short:
        @batch(max_batch_size=3, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            return xs[:-1]

    s = Short()
    results = await asyncio.gather(*(s.handle(i) for i in range(3)), return_exceptions=True)
    for r in results:
        assert isinstance(r, RayServeException)
        assert str(r) == ("Batched function doesn't preserve batch size. The input list has "
                          "length 3 but the returned list has length 2.")


async def test_non_list_result_is_type_error() -> None:
    @batch(max_batch_size=1)
    async def handle(xs: list[int]) -> Any:
        return 42

    with pytest.raises(TypeError, match="must return"):
        await handle(1)


async def test_cancelled_waiting_caller_is_dropped() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        @batch(max_batch_size=3, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[str]) -> list[str]:
            self.batches.append(xs)
            return xs

    r = Recorder()
    a = asyncio.create_task(r.handle("a"))
    b = asyncio.create_task(r.handle("b"))
    await settle()
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    # b's place is free again: two more callers complete the batch of three.
    assert await gather(a, r.handle("c"), r.handle("d")) == ["a", "c", "d"]
    assert r.batches == [["a", "c", "d"]]
    await no_tasks_left()


async def test_caller_cancelled_while_batch_runs_does_not_break_others() -> None:
    release = asyncio.Event()

    class Slow:
        @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            await release.wait()
            return xs

    s = Slow()
    a = asyncio.create_task(s.handle(1))
    b = asyncio.create_task(s.handle(2))
    await settle()
    a.cancel()
    await settle()
    release.set()
    assert await b == 2
    assert a.cancelled()
    await no_tasks_left()


async def test_set_max_batch_size_is_per_instance() -> None:
    first, second = Doubler(), Doubler()
    first.handle.set_max_batch_size(2)
    assert await gather(*(first.handle(i) for i in range(4))) == [0, 2, 4, 6]
    assert await gather(*(second.handle(i) for i in range(4))) == [0, 2, 4, 6]
    assert first.sizes == [2, 2]
    assert second.sizes == [4]


async def test_settings_are_fixed_when_a_batch_starts_filling() -> None:
    # As Ray: changing the settings does not change a batch already filling.
    d = Doubler()
    waiting = [asyncio.create_task(d.handle(i)) for i in range(2)]
    await settle()
    d.handle.set_batch_wait_timeout_s(0)
    d.handle.set_max_batch_size(1)
    assert (d.handle._get_max_batch_size(), d.handle._get_batch_wait_timeout_s()) == (1, 0)
    await settle()
    assert not any(t.done() for t in waiting)
    # The batch of four still fills up ...
    waiting += [asyncio.create_task(d.handle(i)) for i in range(2, 4)]
    async with asyncio.timeout(10):
        assert await gather(*waiting) == [0, 2, 4, 6]
        # ... and the next one uses the new settings.
        assert await d.handle(5) == 10
    assert d.sizes == [4, 1]


async def test_setters_validate() -> None:
    d = Doubler()
    with pytest.raises(ValueError):
        d.handle.set_max_batch_size(0)
    with pytest.raises(ValueError):
        d.handle.set_batch_wait_timeout_s(-1)


async def test_max_concurrent_batches_run_together() -> None:
    started = 0
    both_started = asyncio.Event()

    class Parallel:
        @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S, max_concurrent_batches=2)
        async def handle(self, xs: list[int]) -> list[int]:
            nonlocal started
            started += 1
            if started == 2:
                both_started.set()
            await both_started.wait()
            return xs

    p = Parallel()
    async with asyncio.timeout(10):
        assert await gather(*(p.handle(i) for i in range(4))) == [0, 1, 2, 3]


async def test_batches_split_by_multiplexed_model_id() -> None:
    seen: list[tuple[str, list[int]]] = []

    @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def handle(xs: list[int]) -> list[int]:
        request = context.current_request()
        seen.append((request.multiplexed_model_id if request else "", xs))
        return xs

    async def call(model_id: str, x: int) -> Any:
        context.set_request(context.RequestContext(multiplexed_model_id=model_id))
        return await handle(x)

    assert await gather(call("a", 1), call("b", 2), call("a", 3), call("b", 4)) == [1, 2, 3, 4]
    assert sorted(seen) == [("a", [1, 3]), ("b", [2, 4])]


async def test_full_batch_of_one_model_does_not_wait_for_an_older_one() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def handle(xs: list[int]) -> list[int]:
        return xs

    async def call(model_id: str, x: int) -> Any:
        context.set_request(context.RequestContext(multiplexed_model_id=model_id))
        return await handle(x)

    lonely = asyncio.create_task(call("a", 1))
    await settle()
    assert await gather(call("b", 2), call("b", 3)) == [2, 3]
    assert not lonely.done()
    assert await gather(lonely, call("a", 4)) == [1, 4]


async def test_streaming_batch_gives_each_caller_its_elements() -> None:
    class Streamer:
        @batch(max_batch_size=3, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[int]) -> Any:
            for step in range(3):
                yield [StopIteration if step >= x else x * 10 + step for x in xs]

    s = Streamer()

    async def collect(x: int) -> list[int]:
        return [v async for v in s.handle(x)]

    assert await gather(collect(1), collect(3), collect(2)) == [[10], [30, 31, 32], [20, 21]]
    await no_tasks_left()


async def test_streaming_error_after_items() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def handle(xs: list[int]) -> Any:
        yield xs
        raise KeyError("boom")

    async def collect(x: int) -> list[int]:
        out = []
        with pytest.raises(KeyError):
            async for v in handle(x):
                out.append(v)
        return out

    assert await gather(collect(1), collect(2)) == [[1], [2]]


async def test_streaming_consumer_leaving_early_does_not_stall_others() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def handle(xs: list[int]) -> Any:
        for step in range(3):
            yield [x + step for x in xs]

    async def first_only(x: int) -> Any:
        gen = handle(x)
        value = await anext(gen)
        await gen.aclose()
        return value

    async def collect(x: int) -> list[int]:
        return [v async for v in handle(x)]

    async with asyncio.timeout(10):
        assert await gather(first_only(0), collect(10)) == [0, [10, 11, 12]]
    await no_tasks_left()


async def test_arguments_are_checked_at_the_call() -> None:
    d = Doubler()
    with pytest.raises(TypeError, match=r"Doubler.handle\(\): too many positional"):
        await d.handle(1, 2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'other'"):
        await d.handle(xs=1, other=1)
    with pytest.raises(TypeError, match="missing a required argument: 'xs'"):
        await d.handle()


def test_decoration_time_errors() -> None:
    def sync(self: Any, xs: list[int]) -> list[int]:
        return xs

    async def method(self: Any, xs: list[int]) -> list[int]:
        return xs

    async def star(*xs: list[int]) -> list[int]:
        return list(xs)

    with pytest.raises(TypeError, match="async def"):
        batch(sync)
    with pytest.raises(TypeError, match="async def"):
        batch(max_batch_size=2)(sync)
    with pytest.raises(TypeError, match=r"takes \*xs"):
        batch(star)
    with pytest.raises(TypeError, match="decorate functions or methods"):
        batch(3)  # type: ignore[call-overload]
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_batch_size"):
            batch(max_batch_size=bad)
    wrong: Any
    for wrong in ("3", 2.5):
        with pytest.raises(TypeError, match="max_batch_size"):
            batch(max_batch_size=wrong)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        batch(batch_wait_timeout_s=-0.1)
    with pytest.raises(TypeError, match="batch_wait_timeout_s"):
        batch(batch_wait_timeout_s="1")  # type: ignore[call-overload]
    for wrong in (0, 1.5):
        with pytest.raises(TypeError, match="max_concurrent_batches"):
            batch(max_concurrent_batches=wrong)
    with pytest.raises(TypeError, match="batch_size_fn"):
        batch(batch_size_fn=3)  # type: ignore[call-overload]
    # What Ray accepts: integral floats, no parameters at all, zero timeouts.
    batch(max_batch_size=2.0)(method)  # type: ignore[call-overload]
    batch(batch_wait_timeout_s=0)(method)

    async def nothing() -> list[None]:
        return []

    batch(nothing)


def make_class() -> type:
    """A class defined in a function, so cloudpickle copies it by value."""

    class Model:
        def __init__(self, scale: int) -> None:
            self.scale = scale
            self.sizes: list[int] = []

        @batch(max_batch_size=3, batch_wait_timeout_s=BIG_S)
        async def handle(self, xs: list[int]) -> list[int]:
            self.sizes.append(len(xs))
            return [x * self.scale for x in xs]

    return Model


async def test_class_pickles_with_cloudpickle_and_still_batches() -> None:
    loaded = cloudpickle.loads(cloudpickle.dumps(make_class()))
    m = loaded(2)
    assert await gather(m.handle(1), m.handle(2), m.handle(3)) == [2, 4, 6]
    assert m.sizes == [3]


async def test_instance_pickles_before_and_after_use() -> None:
    model = make_class()(3)
    fresh = cloudpickle.loads(cloudpickle.dumps(model))
    assert await gather(fresh.handle(1), fresh.handle(2), fresh.handle(3)) == [3, 6, 9]
    # After use the queue pickles as an idle one with the same settings.
    fresh.handle.set_max_batch_size(1)
    again = pickle.loads(cloudpickle.dumps(fresh))
    assert await again.handle(4) == 12
    assert again.sizes == [3, 1]


async def test_batched_dunder_call() -> None:
    class Callable_:
        @batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
        async def __call__(self, xs: list[int]) -> list[int]:
            return [x + 1 for x in xs]

    c = Callable_()
    assert await gather(c(1), c(2)) == [2, 3]
