"""Ray Serve's test_handle_streaming.py (and the generator cases of its user-callable unit
tests), ported by meaning: streaming calls from the driver and from a replica, to sync and
async generators, methods that return a generator, and generator functions.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from ladle import serve
from ladle.handle import DeploymentHandle, DeploymentResponseGenerator

NOT_STREAMED = r"Method '{}' returned a generator. You must use " \
    r"`handle.options\(stream=True\)` to call generators on a deployment."
NOT_A_GENERATOR = r"'unary' .* but it did not return a generator"


@serve.deployment
class AsyncStreamer:
    async def __call__(self, n: int, should_error: bool = False) -> AsyncIterator[int]:
        if should_error:
            raise RuntimeError("oopsies")
        for i in range(n):
            yield i

    async def other_method(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def call_inner_generator(self, n: int) -> AsyncIterator[int]:
        # Not a generator itself: a coroutine that returns one.
        return self.other_method(n)

    async def unary(self, n: int) -> int:
        return n


@serve.deployment
class SyncStreamer:
    def __call__(self, n: int, should_error: bool = False) -> Iterator[int]:
        if should_error:
            raise RuntimeError("oopsies")
        yield from range(n)

    def other_method(self, n: int) -> Iterator[int]:
        yield from range(n)

    def call_inner_generator(self, n: int) -> Iterator[int]:
        return self.other_method(n)

    def unary(self, n: int) -> int:
        return n


@serve.deployment
class Delegate:
    """Makes the same calls as the driver does, from inside a replica."""

    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self._h = first
        self._h2 = second

    async def streams(self) -> dict[str, Any]:
        h = self._h.options(stream=True)
        gen = h.remote(5)
        assert isinstance(gen, DeploymentResponseGenerator)
        return {
            "call": [i async for i in gen],
            "other": [i async for i in h.other_method.remote(5)],
            "by_options": [i async for i in h.options(method_name="other_method").remote(5)],
            "inner": [i async for i in h.call_inner_generator.remote(5)],
            "unary": await h.options(stream=False).unary.remote(5),
        }

    async def misuse(self) -> dict[str, str]:
        seen = {}
        for method in ("__call__", "call_inner_generator"):
            try:
                await self._h.options(method_name=method).remote(5)
            except TypeError as exc:
                seen[method] = str(exc)
        h = self._h.options(stream=True)
        try:
            await h.unary.remote(0).__anext__()
        except TypeError as exc:
            seen["unary"] = str(exc)
        try:
            await h.remote(0).__anext__()
        except StopAsyncIteration:
            seen["empty"] = "StopAsyncIteration"
        try:
            await h.remote(0, should_error=True).__anext__()
        except RuntimeError as exc:
            seen["error"] = str(exc)
        return seen

    async def two_downstreams(self) -> list[Any]:
        # Two streams consumed in turns, each ending on its own.
        gen1 = self._h.options(stream=True).remote(1)
        gen2 = self._h2.options(stream=True).remote(2)
        seen: list[Any] = [await gen1.__anext__(), await gen2.__anext__()]
        for gen in (gen1, gen2, gen1, gen2):
            try:
                seen.append(await gen.__anext__())
            except StopAsyncIteration:
                seen.append("stop")
        return seen


@pytest.mark.parametrize("streamer", [AsyncStreamer, SyncStreamer])
def test_streaming_from_the_driver_and_from_a_replica(streamer: Any) -> None:
    delegate = serve.run(Delegate.bind(streamer.bind(),
                                       streamer.options(name="second").bind()))
    h = serve.get_deployment_handle(streamer.name, "default").options(stream=True)

    gen = h.remote(5)
    assert isinstance(gen, DeploymentResponseGenerator)
    assert list(gen) == list(range(5))
    assert list(h.other_method.remote(5)) == list(range(5))
    assert list(h.options(method_name="other_method").remote(5)) == list(range(5))
    assert list(h.call_inner_generator.remote(5)) == list(range(5))
    assert h.options(stream=False).unary.remote(5).result() == 5

    unary = h.options(stream=False)
    for method in ("__call__", "call_inner_generator"):
        with pytest.raises(TypeError, match=NOT_STREAMED.format(method)):
            unary.options(method_name=method).remote(5).result()
    with pytest.raises(TypeError, match=NOT_A_GENERATOR):
        next(h.unary.remote(0))
    with pytest.raises(StopIteration):
        next(h.remote(0))
    with pytest.raises(RuntimeError, match="oopsies"):
        next(h.remote(0, should_error=True))

    assert delegate.streams.remote().result() == {
        "call": list(range(5)), "other": list(range(5)), "by_options": list(range(5)),
        "inner": list(range(5)), "unary": 5}
    seen = delegate.misuse.remote().result()
    for method in ("__call__", "call_inner_generator"):
        assert re.search(NOT_STREAMED.format(method), seen[method]), seen
    assert re.search(NOT_A_GENERATOR, seen["unary"]), seen
    assert seen["empty"] == "StopAsyncIteration"
    assert seen["error"] == "oopsies"
    assert delegate.two_downstreams.remote().result() == [0, 0, "stop", 1, "stop", "stop"]


@serve.deployment
def sync_gen_function(n: int) -> Iterator[int]:
    yield from range(n)


@serve.deployment
async def async_gen_function(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@serve.deployment
class FunctionCaller:
    def __init__(self, sync_fn: DeploymentHandle, async_fn: DeploymentHandle) -> None:
        self._fns = [sync_fn.options(stream=True), async_fn.options(stream=True)]

    async def __call__(self) -> list[list[int]]:
        return [[i async for i in fn.remote(5)] for fn in self._fns]


def test_generator_function_deployments() -> None:
    caller = serve.run(FunctionCaller.bind(sync_gen_function.bind(), async_gen_function.bind()))
    for name in ("sync_gen_function", "async_gen_function"):
        h = serve.get_deployment_handle(name, "default").options(stream=True)
        assert list(h.remote(5)) == list(range(5))
        # Ray names a function deployment by its function in this message.
        with pytest.raises(TypeError, match=NOT_STREAMED.format(name)):
            h.options(stream=False).remote(5).result()
    assert caller.remote().result() == [list(range(5))] * 2
