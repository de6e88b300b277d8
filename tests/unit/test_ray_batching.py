"""Ray Serve's unit/test_batching.py (and test_batching.py's decorator cases), ported by meaning.

Each scenario runs on a batched method and on a batched plain function.
"Not done yet" is checked after letting every ready task run (``settle``),
never after a wall-clock wait; batches that must not fire have a wait timeout
no test reaches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ladle import serve
from ladle.exceptions import RayServeException
from tests.unit.test_batching import BIG_S, gather, no_tasks_left, settle

USE_CLASS = pytest.mark.parametrize("use_class", [True, False], ids=["method", "function"])


def batched(use_class: bool, impl: Callable[..., Any], **options: Any) -> Any:
    """``impl`` (an async def or async generator of lists) batched with ``options``,
    as a method of a fresh instance or as a plain function."""
    if asyncio.iscoroutinefunction(impl):
        async def function(key1: Any, key2: Any) -> Any:
            return await impl(key1, key2)

        class Unary:
            @serve.batch(**options)
            async def method(self, key1: Any, key2: Any) -> Any:
                return await impl(key1, key2)

        return Unary().method if use_class else serve.batch(**options)(function)

    async def generator(key1: Any, key2: Any) -> Any:
        async for value in impl(key1, key2):
            yield value

    class Streaming:
        @serve.batch(**options)
        async def method(self, key1: Any, key2: Any) -> Any:
            async for value in impl(key1, key2):
                yield value

    return Streaming().method if use_class else serve.batch(**options)(generator)


async def pairs(key1: list[Any], key2: list[Any]) -> list[Any]:
    return list(zip(key1, key2))


def test_decorator_validation() -> None:
    @serve.batch
    async def function() -> None:
        pass

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=1.5)
    async def function2() -> None:
        pass

    class Class:
        @serve.batch
        async def method(self) -> None:
            pass

        @serve.batch(max_batch_size=1.0)  # type: ignore[call-overload]
        async def integral_float(self, requests: Any) -> None:
            pass

        @serve.batch(batch_wait_timeout_s=0)
        async def zero_timeout(self, requests: Any) -> None:
            pass

    with pytest.raises(TypeError, match="async def"):
        @serve.batch
        def not_async(requests: Any) -> None:
            pass
    with pytest.raises(ValueError):
        serve.batch(max_batch_size=0)
    with pytest.raises(TypeError):
        serve.batch(max_batch_size=1.1)  # type: ignore[call-overload]
    with pytest.raises(ValueError):
        serve.batch(batch_wait_timeout_s=-0.1)
    with pytest.raises(TypeError):
        serve.batch(batch_wait_timeout_s="a")  # type: ignore[call-overload]


@USE_CLASS
async def test_batch_size_one_runs_at_once(use_class: bool) -> None:
    async def impl(key1: list[Any], key2: list[Any]) -> list[Any]:
        if "raise" in key1:
            raise ZeroDivisionError
        return key1

    call = batched(use_class, impl, max_batch_size=1, batch_wait_timeout_s=BIG_S)
    assert await call("hi", None) == "hi"
    with pytest.raises(ZeroDivisionError):
        await call("raise", None)


@USE_CLASS
async def test_zero_timeout_batches_what_is_waiting(use_class: bool) -> None:
    release = asyncio.Event()

    async def impl(key1: list[Any], key2: list[Any]) -> list[Any]:
        await release.wait()
        if "raise" in key1:
            raise ZeroDivisionError
        return key1

    call = batched(use_class, impl, max_batch_size=2, batch_wait_timeout_s=0)
    release.set()
    assert await call("hi", None) == "hi"
    with pytest.raises(ZeroDivisionError):
        await call("raise", None)
    release.clear()

    # The first call runs alone; the two made while it runs go together (both fail).
    t1 = asyncio.create_task(call("hi1", None))
    await settle()
    assert not t1.done()
    t2 = asyncio.create_task(call("hi2", None))
    t3 = asyncio.create_task(call("raise", None))
    release.set()
    assert await t1 == "hi1"
    for task in (t2, t3):
        with pytest.raises(ZeroDivisionError):
            await task


@USE_CLASS
async def test_long_timeout_waits_for_a_full_batch(use_class: bool) -> None:
    async def impl(key1: list[Any], key2: list[Any]) -> list[Any]:
        if "raise" in key1:
            raise ZeroDivisionError
        return key1

    call = batched(use_class, impl, max_batch_size=3, batch_wait_timeout_s=BIG_S)
    for second, outcome in (("hi2", ["hi1", "hi2", "hi3"]), ("raise", ZeroDivisionError)):
        tasks = [asyncio.create_task(call("hi1", None)), asyncio.create_task(call(second, None))]
        await settle()
        assert not any(t.done() for t in tasks)
        tasks.append(asyncio.create_task(call("hi3", None)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if outcome is ZeroDivisionError:
            assert all(isinstance(r, ZeroDivisionError) for r in results)
        else:
            assert results == outcome


async def test_a_batch_waits_until_full_then_every_caller_finishes() -> None:
    @serve.batch(max_batch_size=10, batch_wait_timeout_s=BIG_S)
    async def no_op(requests: list[Any]) -> list[str]:
        return ["No-op"] * len(requests)

    for _ in range(2):
        tasks = [asyncio.create_task(no_op(None)) for _ in range(9)]
        await settle()
        assert not any(t.done() for t in tasks)
        tasks.append(asyncio.create_task(no_op(None)))
        assert await gather(*tasks) == ["No-op"] * 10


async def test_more_waiting_than_a_batch_holds() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def no_op(requests: list[Any]) -> list[str]:
        return ["No-op"] * len(requests)

    assert await gather(*(no_op(None) for _ in range(10))) == ["No-op"] * 10


MODES = pytest.mark.parametrize("mode", ["args", "kwargs", "mixed", "out-of-order"])


def calls_in_mode(call: Any, mode: str) -> list[Any]:
    """("hi1", "hi2") and ("hi3", "hi4"), passed the way ``mode`` says."""
    if mode == "args":
        return [call("hi1", "hi2"), call("hi3", "hi4")]
    if mode == "kwargs":
        return [call(key1="hi1", key2="hi2"), call(key1="hi3", key2="hi4")]
    if mode == "mixed":
        return [call("hi1", key2="hi2"), call("hi3", key2="hi4")]
    return [call(key2="hi2", key1="hi1"), call(key2="hi4", key1="hi3")]


@MODES
@USE_CLASS
async def test_several_parameters_each_get_a_list(mode: str, use_class: bool) -> None:
    call = batched(use_class, pairs, max_batch_size=2, batch_wait_timeout_s=BIG_S)
    assert await gather(*calls_in_mode(call, mode)) == [("hi1", "hi2"), ("hi3", "hi4")]


async def test_keyword_order_differs_between_callers() -> None:
    # Ray 2.60 pairs the values by the order they were passed in (a bug); ladle by name.
    call = batched(False, pairs, max_batch_size=2, batch_wait_timeout_s=BIG_S)
    assert await gather(call(key1="hi1", key2="hi2"), call(key2="hi4", key1="hi3")) == [
        ("hi1", "hi2"), ("hi3", "hi4")]


async def test_callers_passing_different_parameters_get_different_batches() -> None:
    # Ray 2.60 fails such a batch (AssertionError); ladle keeps them apart.
    seen: list[Any] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def scaled(xs: list[int], factor: Any = 10) -> list[int]:
        seen.append(factor)
        factors = factor if isinstance(factor, list) else [factor] * len(xs)
        return [x * f for x, f in zip(xs, factors)]

    assert await gather(scaled(1), scaled(2, factor=3), scaled(3), scaled(4, factor=5)) == [
        10, 6, 30, 20]
    # Nobody passed `factor`: the function's own default, not a list of it (as Ray).
    assert sorted(map(str, seen)) == ["10", "[3, 5]"]


def start_pair(call: Any, use_gen: bool) -> list[asyncio.Task[Any]]:
    """Two calls as tasks; for a generator, each task takes its first element."""
    calls = [call(a, b) for a, b in (("hi1", "hi2"), ("hi3", "hi4"))]
    return [asyncio.create_task(c.__anext__() if use_gen else c) for c in calls]


@pytest.mark.parametrize("use_gen", [True, False], ids=["generator", "unary"])
@USE_CLASS
async def test_cancelled_callers_leave_the_batch(use_class: bool, use_gen: bool) -> None:
    release = asyncio.Event()
    ran = False

    async def unary(key1: list[Any], key2: list[Any]) -> list[Any]:
        nonlocal ran
        await release.wait()
        ran = True
        return list(zip(key1, key2))

    async def streaming(key1: list[Any], key2: list[Any]) -> Any:
        yield await unary(key1, key2)

    call = batched(use_class, streaming if use_gen else unary, max_batch_size=2,
                   batch_wait_timeout_s=BIG_S)

    tasks = start_pair(call, use_gen)
    await settle()
    assert not any(t.done() for t in tasks)
    tasks[0].cancel()
    await settle()
    assert tasks[0].done() and not tasks[1].done()
    tasks[1].cancel()
    await settle()
    assert all(t.done() for t in tasks)
    assert not ran  # neither call reached the function

    release.set()
    assert await gather(*start_pair(call, use_gen)) == [("hi1", "hi2"), ("hi3", "hi4")]
    await no_tasks_left()


@pytest.mark.parametrize("use_gen", [True, False], ids=["generator", "unary"])
@USE_CLASS
async def test_cancelling_after_an_error(use_class: bool, use_gen: bool) -> None:
    fixed = asyncio.Event()

    async def unary(key1: list[Any], key2: list[Any]) -> list[Any]:
        if not fixed.is_set():
            raise ValueError()
        return list(zip(key1, key2))

    async def streaming(key1: list[Any], key2: list[Any]) -> Any:
        yield await unary(key1, key2)

    call = batched(use_class, streaming if use_gen else unary, max_batch_size=2,
                   batch_wait_timeout_s=BIG_S)

    for task in start_pair(call, use_gen):
        task.cancel()
    fixed.set()
    assert await gather(*start_pair(call, use_gen)) == [("hi1", "hi2"), ("hi3", "hi4")]


@USE_CLASS
async def test_setters_and_getters(use_class: bool) -> None:
    call = batched(use_class, pairs, max_batch_size=2, batch_wait_timeout_s=1000)
    assert (call._get_max_batch_size(), call._get_batch_wait_timeout_s()) == (2, 1000)
    assert await gather(call("hi1", "hi2"), call("hi3", "hi4")) == [("hi1", "hi2"),
                                                                   ("hi3", "hi4")]
    call.set_max_batch_size(3)
    call.set_batch_wait_timeout_s(15000)
    assert (call._get_max_batch_size(), call._get_batch_wait_timeout_s()) == (3, 15000)
    three = [asyncio.create_task(call(f"hi{i}", f"hi{i + 1}")) for i in (1, 3)]
    await settle()
    assert not any(t.done() for t in three)  # a batch is three calls now
    three.append(asyncio.create_task(call("hi5", "hi6")))
    assert await gather(*three) == [("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")]


async def test_settings_in_force_when_a_batch_started_filling_stay() -> None:
    call = batched(False, pairs, max_batch_size=2, batch_wait_timeout_s=1000)
    call.set_max_batch_size(3)
    call.set_batch_wait_timeout_s(15000)
    pending = [asyncio.create_task(call("hi1", "hi2")), asyncio.create_task(call("hi3", "hi4"))]
    await settle()
    assert not any(t.done() for t in pending)
    # Changed while the batch fills: it still waits for its third call.
    call.set_max_batch_size(1)
    call.set_batch_wait_timeout_s(0)
    assert (call._get_max_batch_size(), call._get_batch_wait_timeout_s()) == (1, 0)
    await settle()
    assert not any(t.done() for t in pending)
    pending.append(asyncio.create_task(call("hi5", "hi6")))
    assert await gather(*pending) == [("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")]
    # The next batch uses the new settings: one call goes alone at once.
    assert await call("hi1", "hi2") == ("hi1", "hi2")


@MODES
@pytest.mark.parametrize("length", [0, 2, 5])
@USE_CLASS
async def test_generators_stream_each_caller_its_elements(mode: str, length: int,
                                                          use_class: bool) -> None:
    async def impl(key1: list[Any], key2: list[Any]) -> Any:
        for i in range(length):
            yield [(i, a, b) for a, b in zip(key1, key2)]

    call = batched(use_class, impl, max_batch_size=2, batch_wait_timeout_s=BIG_S)
    gens = calls_in_mode(call, mode)
    first = asyncio.create_task(_collect(gens[0]))
    assert await _collect(gens[1]) == [(i, "hi3", "hi4") for i in range(length)]
    assert await first == [(i, "hi1", "hi2") for i in range(length)]


async def _collect(gen: Any) -> list[Any]:
    return [item async for item in gen]


@pytest.mark.parametrize("error", ["runtime_error", "mismatched_lengths"])
async def test_generator_errors_reach_every_caller_then_end_it(error: str) -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def func(key1: list[Any], key2: list[Any]) -> Any:
        for i in range(5):
            results = [(i, a, b) for a, b in zip(key1, key2)]
            if i == 2:
                if error == "runtime_error":
                    raise RuntimeError("Testing error")
                yield results * 2
            yield results

    gens = [func("hi1", "hi2"), func("hi3", "hi4")]
    for gen in gens:
        for _ in range(2):
            await gen.__anext__()
        expected = RuntimeError if error == "runtime_error" else RayServeException
        with pytest.raises(expected):
            await gen.__anext__()
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()


@pytest.mark.parametrize("stop", [StopAsyncIteration, StopIteration])
async def test_a_stop_token_ends_one_callers_stream(stop: type) -> None:
    callers = 4
    next_round = asyncio.Event()

    @serve.batch(max_batch_size=callers, batch_wait_timeout_s=BIG_S)
    async def sequential_terminator(ids: list[int]) -> Any:
        for finished in range(1, callers + 1):
            next_round.clear()
            yield [stop] * finished + ids[finished:]
            await next_round.wait()

    gens = [sequential_terminator(i) for i in range(callers)]
    consumers = [asyncio.create_task(_collect(gen)) for gen in gens]
    for i, consumer in enumerate(consumers):
        assert await consumer == [i] * i
        next_round.set()  # each finished caller lets the batch go on


async def test_generator_setters_while_a_batch_streams() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=BIG_S)
    async def three_times(key1: list[Any], key2: list[Any]) -> Any:
        for _ in range(3):
            yield list(zip(key1, key2))

    first = [three_times("hi1", "hi2"), three_times("hi3", "hi4")]
    for gen, expected in zip(first, [("hi1", "hi2"), ("hi3", "hi4")]):
        for _ in range(2):
            assert await gen.__anext__() == expected
    three_times.set_max_batch_size(3)
    three_times.set_batch_wait_timeout_s(15000)
    assert (three_times._get_max_batch_size(), three_times._get_batch_wait_timeout_s()) == (
        3, 15000)
    args = [("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")]
    second = [asyncio.create_task(_collect(three_times(*a))) for a in args]
    for gen, expected in zip(first, [("hi1", "hi2"), ("hi3", "hi4")]):
        assert await _collect(gen) == [expected]
    assert await gather(*second) == [[a] * 3 for a in args]


def _sizes(items: list[dict[str, Any]]) -> int:
    return sum(item["size"] for item in items)


async def test_batch_size_fn_defers_what_does_not_fit() -> None:
    batches: list[list[str]] = []

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=BIG_S, batch_size_fn=_sizes)
    async def handler(requests: list[dict[str, Any]]) -> list[str]:
        batches.append([r["value"] for r in requests])
        return [r["value"] for r in requests]

    # 6 + 6 > 10: the first goes alone as soon as the second does not fit.
    first = asyncio.create_task(handler({"size": 6, "value": "first"}))
    second = asyncio.create_task(handler({"size": 6, "value": "second"}))
    assert await first == "first"
    await settle()
    assert not second.done()  # alone, it waits for company like any batch
    assert await gather(second, handler({"size": 4, "value": "third"})) == ["second", "third"]
    assert batches == [["first"], ["second", "third"]]


async def test_batch_size_fn_item_too_big_alone_fails() -> None:
    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.01, batch_size_fn=_sizes)
    async def handler(requests: list[dict[str, Any]]) -> list[str]:
        return [r["value"] for r in requests]

    first = asyncio.create_task(handler({"size": 6, "value": "first"}))
    with pytest.raises(RuntimeError, match="Size of item is greater than max_batch_size"):
        await handler({"size": 12, "value": "second"})
    async with asyncio.timeout(10):
        assert await first == "first"


async def test_batch_size_fn_items_that_fit_share_a_batch() -> None:
    batches: list[list[str]] = []

    @serve.batch(max_batch_size=20, batch_wait_timeout_s=0.01, batch_size_fn=_sizes)
    async def handler(requests: list[dict[str, Any]]) -> list[str]:
        batches.append([r["value"] for r in requests])
        return [r["value"] for r in requests]

    async with asyncio.timeout(10):
        assert await gather(*(handler({"size": s, "value": v})
                              for s, v in ((5, "a"), (6, "b"), (7, "c")))) == ["a", "b", "c"]
    assert batches == [["a", "b", "c"]]  # 5 + 6 + 7 <= 20
