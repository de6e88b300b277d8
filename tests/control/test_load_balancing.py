"""Requests spread over replicas, never past max_ongoing_requests, with backpressure past the queue."""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from typing import Any

import pytest

from ladle import serve
from ladle.exceptions import BackPressureError
from tests.conftest import wait_for


@serve.deployment(max_ongoing_requests=3, num_replicas=2)
class Worker:
    """Records how many requests ran at once on this replica."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self.served = 0

    async def work(self, i: int) -> int:
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            await asyncio.sleep(0.01)  # workload: keeps requests overlapping
        finally:
            self.current -= 1
        self.served += 1
        return i

    async def stats(self) -> tuple[int, int, int]:
        return os.getpid(), self.peak, self.served


@serve.deployment(max_ongoing_requests=10)
class Caller:
    def __init__(self, worker: Any) -> None:
        self.worker = worker

    async def fan_out(self, n: int) -> list[int]:
        return list(await asyncio.gather(*(self.worker.work.remote(i) for i in range(n))))


def peaks(handle: Any, n: int = 2) -> dict[int, tuple[int, int]]:
    """(peak, served) of each of the ``n`` replicas, by pid."""
    seen: dict[int, tuple[int, int]] = {}

    def all_seen() -> bool:
        for response in [handle.stats.remote() for _ in range(8)]:
            pid, peak, served = response.result(timeout_s=10)
            seen[pid] = (peak, served)
        return len(seen) >= n

    wait_for(all_seen, timeout_s=10, message=f"stats from {n} replicas")
    return seen


def test_requests_spread_across_replicas() -> None:
    @serve.deployment(num_replicas=2)
    class Model:
        async def __call__(self) -> int:
            await asyncio.sleep(0.001)
            return os.getpid()

    handle = serve.run(Model.bind())
    responses = [handle.remote() for _ in range(200)]
    counts = collections.Counter(r.result(timeout_s=20) for r in responses)
    assert len(counts) == 2, counts
    assert os.getpid() not in counts
    assert all(count > 0 for count in counts.values()), counts
    assert sum(counts.values()) == 200


async def test_max_ongoing_requests_is_never_exceeded() -> None:
    handle = serve.run(Worker.bind(), route_prefix=None).work
    results = await asyncio.gather(*(handle.remote(i) for i in range(100)))
    assert results == list(range(100))
    by_pid = await asyncio.to_thread(peaks, handle)
    assert len(by_pid) == 2
    for peak, served in by_pid.values():
        assert 1 <= peak <= 3, by_pid
        assert served > 0, by_pid
    assert sum(served for _, served in by_pid.values()) == 100


def test_max_ongoing_requests_holds_with_two_callers() -> None:
    caller = serve.run(Caller.bind(Worker.bind()), name="two_callers", route_prefix=None)
    worker = serve.get_deployment_handle("Worker", "two_callers")

    async def from_driver() -> list[int]:
        return list(await asyncio.gather(*(worker.work.remote(i) for i in range(100, 150))))

    # Both callers at once: the other deployment's replica and this process's own loop.
    fanned = caller.fan_out.remote(50)
    driven = asyncio.run(from_driver())
    assert driven == list(range(100, 150))
    assert fanned.result(timeout_s=20) == list(range(50))
    by_pid = peaks(worker)
    for peak, _ in by_pid.values():
        assert 1 <= peak <= 3, by_pid
    assert sum(served for _, served in by_pid.values()) == 100


def test_backpressure_past_max_queued_requests() -> None:
    @serve.deployment(max_ongoing_requests=10)
    class Gate:
        def __init__(self) -> None:
            self.opened = asyncio.Event()
            self.waiting = 0

        async def wait(self) -> None:
            self.waiting += 1
            await self.opened.wait()

        async def count(self) -> int:
            return self.waiting

        async def open(self) -> None:
            self.opened.set()

    @serve.deployment(max_ongoing_requests=2, max_queued_requests=2)
    class Busy:
        def __init__(self, gate: Any) -> None:
            self.gate = gate

        async def __call__(self, i: int) -> int:
            await self.gate.wait.remote()
            return i

    busy = serve.run(Busy.bind(Gate.bind()), name="busy", route_prefix=None)
    gate = serve.get_deployment_handle("Gate", "busy")
    try:
        running = [busy.remote(0), busy.remote(1)]
        wait_for(lambda: gate.count.remote().result(timeout_s=10) == 2,
                 message="both slots to be busy")
        queued = [busy.remote(2), busy.remote(3)]
        for i in (4, 5):
            with pytest.raises(BackPressureError) as info:
                busy.remote(i).result(timeout_s=10)
            assert "max_queued_requests=2" in str(info.value)
    finally:
        gate.open.remote().result(timeout_s=10)
    assert [r.result(timeout_s=10) for r in running + queued] == [0, 1, 2, 3]
    # With the queue drained, calls are accepted again.
    assert busy.remote(6).result(timeout_s=10) == 6


def test_sync_method_does_not_block_the_replica_loop() -> None:
    @serve.deployment
    class Mixed:
        def __init__(self) -> None:
            self.release = threading.Event()
            self.entered = threading.Event()

        def blocking(self) -> str:
            self.entered.set()
            assert self.release.wait(timeout=30)
            return "released"

        async def entered_blocking(self) -> bool:
            return self.entered.is_set()

        async def ping(self) -> str:
            return "pong"

        async def unblock(self) -> None:
            self.release.set()

    handle = serve.run(Mixed.bind())
    blocked = handle.blocking.remote()
    try:
        wait_for(lambda: handle.entered_blocking.remote().result(timeout_s=10),
                 message="the sync method to start")
        # The sync method is still blocked, and the async ones answer.
        assert handle.ping.remote().result(timeout_s=10) == "pong"
    finally:
        handle.unblock.remote().result(timeout_s=10)
    assert blocked.result(timeout_s=10) == "released"
