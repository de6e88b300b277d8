"""``@serve.batch`` with real replicas: concurrent calls are gathered, each caller gets its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ladle import serve

# Long enough that every batch below is cut because it is full, never by the
# timeout; a bug that left a batch short would show as a wrong size.
_WAIT_S = 10.0


@serve.deployment(max_ongoing_requests=100)
class Doubler:
    def __init__(self) -> None:
        self._batches: list[tuple[str, int]] = []

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=_WAIT_S)
    async def __call__(self, xs: list[int]) -> list[int]:
        self._batches.append((serve.get_multiplexed_model_id(), len(xs)))
        if any(x < 0 for x in xs):
            raise ValueError(f"negative input in batch {xs}")
        return [2 * x for x in xs]

    def batches(self) -> list[tuple[str, int]]:
        batches, self._batches = self._batches, []
        return batches


def test_concurrent_calls_from_the_driver_are_batched() -> None:
    handle = serve.run(Doubler.bind())

    responses = [handle.remote(i) for i in range(20)]
    assert [r.result(timeout_s=30) for r in responses] == [2 * i for i in range(20)]
    assert handle.batches.remote().result() == [("", 5)] * 4

    # One failing item fails every caller of its batch, with the user's error.
    responses = [handle.remote(x) for x in (1, 2, -3, 4, 5)]
    for response in responses:
        with pytest.raises(ValueError, match="negative input"):
            response.result(timeout_s=30)
    # The replica goes on batching afterwards.
    responses = [handle.remote(i) for i in range(5)]
    assert [r.result(timeout_s=30) for r in responses] == [0, 2, 4, 6, 8]
    assert handle.batches.remote().result() == [("", 5), ("", 5)]


def test_batches_from_an_event_loop_and_per_model_id() -> None:
    handle = serve.run(Doubler.bind())

    async def main() -> list[int]:
        return await asyncio.gather(*(handle.remote(i) for i in range(10)))

    assert asyncio.run(main()) == [2 * i for i in range(10)]
    assert handle.batches.remote().result() == [("", 5), ("", 5)]

    # Items for different multiplexed models never share a batch; the batch
    # sees its model id.
    a = handle.options(multiplexed_model_id="a")
    b = handle.options(multiplexed_model_id="b")
    responses = [(a if i % 2 else b).remote(i) for i in range(10)]
    assert [r.result(timeout_s=30) for r in responses] == [2 * i for i in range(10)]
    assert sorted(handle.batches.remote().result()) == [("a", 5), ("b", 5)]


def test_batched_function_deployment() -> None:
    @serve.deployment(max_ongoing_requests=100)
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=_WAIT_S)
    async def shout(words: list[str]) -> list[str]:
        return [f"{w.upper()}! (batch of {len(words)})" for w in words]

    handle = serve.run(shout.bind())
    responses = [handle.remote(w) for w in ("a", "b", "c", "d", "e", "f", "g", "h")]
    assert [r.result(timeout_s=30) for r in responses] == [
        f"{w}! (batch of 4)" for w in "ABCDEFGH"]


@serve.deployment(max_ongoing_requests=100)
class Textgen:
    """Ray's batching tests: several parameters, batch_size_fn, streamed batches over HTTP."""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=_WAIT_S)
    async def stream(self, prompts: list[str]) -> AsyncIterator[list[str]]:
        for _ in range(10):
            yield prompts

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=_WAIT_S)
    async def pair(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return list(zip(key1, key2))

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=_WAIT_S,
                 batch_size_fn=lambda texts: sum(len(t) for t in texts))
    async def by_length(self, texts: list[str]) -> list[int]:
        return [len(texts)] * len(texts)

    @serve.batch(max_batch_size=5)
    async def not_a_list(self, xs: list[int]) -> int:
        return len(xs)

    async def __call__(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self.stream(request.query_params["prompt"]))


def test_ray_batching_cases_in_a_replica(http_url: str) -> None:
    handle = serve.run(Textgen.bind())

    # Four HTTP requests streamed from one batch, each getting its own prompt back.
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda i: httpx.get(f"{http_url}/?prompt=hola{i}", timeout=30),
                              range(4)))
    assert [(r.status_code, r.text) for r in texts] == [(200, f"hola{i}" * 10) for i in range(4)]

    # The batched generator through a streaming handle call.
    gens = [handle.options(stream=True).stream.remote(p) for p in "abcd"]
    assert [list(g) for g in gens] == [[p] * 10 for p in "abcd"]

    responses = [handle.pair.remote("hi1", "hi2"), handle.pair.remote(key2="hi4", key1="hi3")]
    assert [r.result(timeout_s=30) for r in responses] == [("hi1", "hi2"), ("hi3", "hi4")]

    # Lengths 4 + 4 fit under 10, a third 4 does not: a batch of two; 4 + 6 fill the next.
    responses = [handle.by_length.remote(t) for t in ("aaaa", "bbbb", "cccc", "dddddd")]
    assert [r.result(timeout_s=30) for r in responses] == [2, 2, 2, 2]
    with pytest.raises(RuntimeError, match="greater than max_batch_size"):
        handle.by_length.remote("x" * 11).result(timeout_s=30)

    with pytest.raises(TypeError, match="must return"):
        handle.not_a_list.remote(1).result(timeout_s=30)
