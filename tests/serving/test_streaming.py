"""Streaming calls: sync and async generators, flow control, errors, misuse, cancellation.

Producers signal through files under ``tmp_path``: a "go" file they wait for,
and a "count" file holding how many items they have yielded so far.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ladle import serve
from ladle.exceptions import RequestCancelledError
from ladle.handle import DeploymentHandle, DeploymentResponseGenerator
from tests.conftest import wait_for

MAX_AHEAD = 64


class StreamError(Exception):
    pass


def _write_count(path: str, n: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(str(n))
    os.replace(tmp, path)


def _read_count(path: Path) -> int:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def _wait_file(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)


async def _await_file(path: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


@serve.deployment
class Streamer:
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    def fail_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise StreamError(f"sync generator failed after {n}")

    async def afail_after(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        raise StreamError(f"async generator failed after {n}")

    def gated(self, go: str) -> Iterator[str]:
        yield "first"
        _wait_file(go)
        yield "second"

    async def agated(self, go: str) -> AsyncIterator[str]:
        yield "first"
        await _await_file(go)
        yield "second"

    def endless(self, count_file: str, stopped_file: str) -> Iterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
                _write_count(count_file, i)
        finally:
            _write_count(stopped_file, i)

    async def aendless(self, count_file: str, stopped_file: str) -> AsyncIterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
                _write_count(count_file, i)
                await asyncio.sleep(0)
        finally:
            _write_count(stopped_file, i)

    async def astall(self, n: int, stopped_file: str) -> AsyncIterator[int]:
        for i in range(n):
            yield i
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            with open(stopped_file, "w") as f:
                f.write("cancelled")
            raise

    def unary(self) -> int:
        return 1

    async def aunary(self) -> int:
        return 2


@serve.deployment
class Relay:
    def __init__(self, streamer: DeploymentHandle) -> None:
        self.streamer = streamer.options(stream=True)

    async def relay(self, method: str, n: int) -> AsyncIterator[int]:
        # Streaming from inside a deployment, re-streamed to the caller.
        async for item in self.streamer.options(method_name=method).remote(n):
            yield item * 10

    async def collect(self, method: str, n: int) -> list[int]:
        return [i async for i in self.streamer.options(method_name=method).remote(n)]


def test_sync_and_async_generators_with_for_and_async_for() -> None:
    serve.run(Relay.bind(Streamer.bind()))
    streamer = serve.get_deployment_handle("Streamer", "default").options(stream=True)
    relay = serve.get_deployment_handle("Relay", "default")

    for method in ("count", "acount"):
        gen = streamer.options(method_name=method).remote(100)
        assert isinstance(gen, DeploymentResponseGenerator)
        assert list(gen) == list(range(100))
        assert list(streamer.options(method_name=method).remote(0)) == []

    async def consume() -> dict[str, list[int]]:
        out = {}
        for method in ("count", "acount"):
            out[method] = [i async for i in streamer.options(method_name=method).remote(50)]
        out["relay"] = [i async for i in relay.options(stream=True).relay.remote("count", 5)]
        return out

    assert asyncio.run(consume()) == {"count": list(range(50)), "acount": list(range(50)),
                                      "relay": [0, 10, 20, 30, 40]}
    assert list(relay.options(stream=True).relay.remote("acount", 3)) == [0, 10, 20]
    assert relay.collect.remote("count", 70).result(timeout_s=10) == list(range(70))
    assert relay.collect.remote("acount", 70).result(timeout_s=10) == list(range(70))


@pytest.mark.parametrize("method", ["gated", "agated"])
def test_items_arrive_as_they_are_produced(tmp_path: Path, method: str) -> None:
    handle = serve.run(Streamer.bind()).options(stream=True, method_name=method)
    go = tmp_path / "go"

    # `for` outside a loop: the producer is blocked until `go` exists, so
    # the first item must arrive before the second is produced.
    gen = handle.remote(str(go))
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(next, gen).result(timeout=15) == "first"
    go.touch()
    assert list(gen) == ["second"]

    async def in_loop() -> None:
        go2 = tmp_path / "go2"
        agen = handle.remote(str(go2))
        assert await asyncio.wait_for(agen.__anext__(), timeout=15) == "first"
        go2.touch()
        assert [i async for i in agen] == ["second"]

    asyncio.run(in_loop())


def _wait_until_stable(count_file: Path, min_count: int) -> int:
    """The producer's count once it has stopped growing for a while (bounded)."""
    wait_for(lambda: _read_count(count_file) >= min_count, message="the producer to start")
    last = [-1, time.monotonic()]

    def stable() -> bool:
        now = _read_count(count_file)
        if now != last[0]:
            last[0], last[1] = now, time.monotonic()
            return False
        return time.monotonic() - last[1] >= 0.5

    wait_for(stable, timeout_s=20, message="the producer to stop producing")
    return int(last[0])


@pytest.mark.parametrize("method", ["endless", "aendless"])
def test_slow_consumer_bounds_the_producer_and_cancel_stops_it(tmp_path: Path,
                                                               method: str) -> None:
    handle = serve.run(Streamer.bind()).options(stream=True, method_name=method)
    count_file, stopped_file = tmp_path / "count", tmp_path / "stopped"
    gen = handle.remote(str(count_file), str(stopped_file))

    assert next(gen) == 0
    consumed = 1
    produced = _wait_until_stable(count_file, 1)
    assert produced - consumed <= MAX_AHEAD, f"producer ran {produced - consumed} ahead"

    # Consuming more lets it go on, still within the window.
    for expected in range(1, 101):
        assert next(gen) == expected
    consumed = 101
    produced = _wait_until_stable(count_file, consumed)
    assert 0 <= produced - consumed <= MAX_AHEAD, f"producer ran {produced - consumed} ahead"

    # Cancelling mid-way stops the producer (its generator is closed).
    gen.cancel()
    assert gen.cancelled()
    wait_for(stopped_file.exists, message="the producer to be stopped")
    stopped_at = _read_count(stopped_file)
    assert stopped_at <= consumed + MAX_AHEAD
    with pytest.raises(RequestCancelledError):
        for _ in range(2 * MAX_AHEAD):  # what was buffered may still come first
            next(gen)


async def test_cancelling_the_consuming_task_stops_the_producer(tmp_path: Path) -> None:
    handle = serve.run(Streamer.bind()).options(stream=True, method_name="astall")
    stopped_file = tmp_path / "stopped"
    received: list[int] = []

    async def consume() -> None:
        async for item in handle.remote(3, str(stopped_file)):
            received.append(item)

    task = asyncio.ensure_future(consume())
    # The producer yields three items, then waits forever: the task ends up
    # waiting for the fourth.
    await asyncio.to_thread(wait_for, lambda: len(received) == 3, message="three items")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(wait_for, stopped_file.exists,
                            message="the producer to be cancelled")
    assert stopped_file.read_text() == "cancelled"


@pytest.mark.parametrize("method", ["fail_after", "afail_after"])
def test_generator_exception_surfaces_after_earlier_items(method: str) -> None:
    handle = serve.run(Streamer.bind()).options(stream=True, method_name=method)

    received = []
    with pytest.raises(StreamError, match="failed after 3") as info:
        for item in handle.remote(3):
            received.append(item)
    assert received == [0, 1, 2]
    assert method in "".join(info.value.__notes__)

    async def in_loop() -> list[int]:
        items = []
        with pytest.raises(StreamError, match="failed after 40"):
            async for item in handle.remote(40):  # more than one credit window
                items.append(item)
        return items

    assert asyncio.run(in_loop()) == list(range(40))
    # Failing before the first item.
    with pytest.raises(StreamError):
        next(iter(handle.remote(0)))


def test_stream_misuse_raises_type_error() -> None:
    handle = serve.run(Streamer.bind())
    streaming = handle.options(stream=True)

    # A generator cannot be passed to another call.
    gen = streaming.count.remote(3)
    with pytest.raises(TypeError):
        handle.unary.remote(gen)
    with pytest.raises(TypeError):
        handle.unary.remote(x=gen)
    assert list(gen) == [0, 1, 2]

    async def await_it() -> None:
        agen = streaming.acount.remote(2)
        with pytest.raises(TypeError, match="async for"):
            await agen
        assert [i async for i in agen] == [0, 1]

    asyncio.run(await_it())

    # stream=True on a method that is not a generator.
    for method in ("unary", "aunary"):
        with pytest.raises(TypeError, match=method):
            list(streaming.options(method_name=method).remote())
    # A generator called without stream=True.
    for method in ("count", "acount"):
        with pytest.raises(TypeError, match="stream=True"):
            handle.options(method_name=method).remote(3).result(timeout_s=10)
    # The replica is fine afterwards.
    assert handle.unary.remote().result(timeout_s=10) == 1


@serve.deployment
class BusyStreamer:
    """Yields its first item, then keeps the replica's loop busy (no await) until told."""

    async def busy(self, go: str) -> AsyncIterator[str]:
        yield "first"
        deadline = time.monotonic() + 30
        while not os.path.exists(go) and time.monotonic() < deadline:
            pass  # never gives the loop a turn
        yield "second"


def test_the_first_item_leaves_while_the_producer_keeps_the_loop_busy(tmp_path: Path) -> None:
    # Held to the end of the loop pass, "first" would wait for "go", which the test only
    # creates after it has "first": a hang instead of a pass.
    handle = serve.run(BusyStreamer.bind()).options(stream=True, method_name="busy")
    go = tmp_path / "go"
    gen = handle.remote(str(go))
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(next, gen).result(timeout=15) == "first"
    go.touch()
    assert list(gen) == ["second"]
