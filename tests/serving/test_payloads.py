"""Large payloads: shared memory both ways, released when dropped, never leaked; copy-on-send.

Buffers of at least ``shared_memory.MIN_BYTES`` cross the local transport in
shared-memory segments (``_core/shared_memory.py``, ``_backends/local/shm_link.py``).
These tests check what arrives (values and types, both ways, in streams and HTTP
bodies), that segments are actually used and come back, that a replica killed or
a request cancelled mid-transfer leaves nothing lent, and that what the replica
gets is the argument as it was when ``.remote()`` returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ladle import serve
from ladle._core import shared_memory
from ladle.exceptions import RequestCancelledError
from tests.conftest import replica_pids, wait_for

BIG = 2 * shared_memory.MIN_BYTES + 123  # odd-sized on purpose


def _rss_shmem_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1])
    return 0


def _memfd_mappings() -> int:
    """Distinct ladle memfds this process maps."""
    names = {line.split()[-2] for line in Path("/proc/self/maps").read_text().splitlines()
             if "/memfd:ladle-" in line}
    return len(names)


@serve.deployment(max_ongoing_requests=100)
class Store:
    def __init__(self) -> None:
        self.kept: list[Any] = []
        self.gate = threading.Event()

    def nbytes(self, a: Any) -> int:
        return int(a.nbytes)

    async def echo(self, value: Any) -> Any:
        return value

    def describe(self, value: Any) -> tuple[str, int, str]:
        raw = memoryview(value).cast("B") if not isinstance(value, np.ndarray) else value.data
        return type(value).__name__, len(raw.tobytes()), hashlib.sha1(raw).hexdigest()

    def checksum(self, a: Any) -> int:
        return int(a.sum())

    def hold(self, a: Any) -> int:
        """Keep ``a`` and block until released (or cancelled, or killed)."""
        self.kept.append(a)
        self.gate.wait()
        return int(a.nbytes)

    async def hold_async(self, a: Any) -> None:
        await asyncio.Event().wait()

    def release(self) -> None:
        self.gate.set()

    def hold_until(self, path: str) -> bool:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def drop(self) -> int:
        n = len(self.kept)
        self.kept.clear()
        return n

    def pool(self) -> dict[str, int]:
        return {**shared_memory.pool.statistics(), "rss_shmem_kb": _rss_shmem_kb(),
                "mapped": _memfd_mappings()}

    def arrays(self, n: int, size: int) -> Any:
        for i in range(n):
            yield np.full(size, i, dtype=np.uint8)


def _sha1(data: bytes | memoryview) -> str:
    return hashlib.sha1(data).hexdigest()


def test_large_values_cross_both_ways_and_keep_their_types() -> None:
    handle = serve.run(Store.bind())
    a = np.arange(7 * 10_000, dtype=np.float64).reshape(-1, 7)[:, :5].copy()
    back = handle.echo.remote(a).result()
    assert type(back) is np.ndarray and back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert back.flags.writeable  # the receiver owns what it got
    assert handle.nbytes.remote(a).result() == a.nbytes
    data = os.urandom(BIG)
    for value, kind in ((data, "bytes"), (bytearray(data), "bytearray"),
                        (memoryview(data), "memoryview")):
        assert handle.describe.remote(value).result() == (kind, BIG, _sha1(data))
        echoed = handle.echo.remote(value).result()
        assert type(echoed) is type(value) and bytes(echoed) == data
    # Both sides lent segments, and get every one of them back once the values go.
    del back, echoed
    assert shared_memory.pool.statistics()["segments"] > 0
    replica = handle.pool.remote().result()
    assert replica["segments"] > 0
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 0
             and handle.pool.remote().result()["lent"] == 0, message="segments to come back")


async def test_async_callers_and_streams_carry_large_values() -> None:
    handle = serve.run(Store.bind())
    arrays = [np.full(BIG, i, dtype=np.uint8) for i in range(8)]
    got = await asyncio.gather(*[handle.echo.remote(a) for a in arrays])
    for a, b in zip(arrays, got):
        np.testing.assert_array_equal(a, b)
    items = [item async for item in handle.options(stream=True).arrays.remote(5, BIG)]
    assert [int(item[0]) for item in items] == list(range(5))
    assert all(item.nbytes == BIG and int(item[-1]) == i for i, item in enumerate(items))


@serve.deployment
class Bodies:
    async def __call__(self, request: Any) -> Any:
        if request.method == "POST":
            body = await request.body()
            return {"type": type(body).__name__, "len": len(body), "sha1": _sha1(body)}
        return b"z" * int(request.query_params["n"])


def test_large_http_bodies_both_ways(http_url: str) -> None:
    serve.run(Bodies.bind(), route_prefix="/bodies")
    data = os.urandom(3 * BIG)
    with httpx.Client(timeout=30) as client:
        posted = client.post(f"{http_url}/bodies", content=data)
        assert posted.status_code == 200, posted.text
        assert posted.json() == {"type": "bytes", "len": len(data), "sha1": _sha1(data)}
        got = client.get(f"{http_url}/bodies", params={"n": 3 * BIG})
        assert got.status_code == 200 and got.content == b"z" * (3 * BIG)


@pytest.mark.timeout(300)
async def test_ten_thousand_large_calls_leave_shared_memory_flat() -> None:
    handle = serve.run(Store.bind())
    a = np.ones(shared_memory.MIN_BYTES, dtype=np.uint8)

    async def batch() -> None:
        got = await asyncio.gather(*[handle.echo.remote(a) for _ in range(100)])
        assert all(g.nbytes == a.nbytes for g in got)

    for _ in range(5):  # warm-up: the pools reach their working size
        await batch()
    before_driver, before_replica = _rss_shmem_kb(), await handle.pool.remote()
    for _ in range(100):
        await batch()
    after_driver, after_replica = _rss_shmem_kb(), await handle.pool.remote()
    # Each side keeps at most a few free segments per size class beyond what is in use.
    slack_kb = 4 * shared_memory.MIN_BYTES // 1024
    assert after_driver <= before_driver + slack_kb
    assert after_replica["rss_shmem_kb"] <= before_replica["rss_shmem_kb"] + slack_kb
    assert after_replica["segments"] <= before_replica["segments"] + 2
    assert shared_memory.pool.statistics()["segments"] <= 110


def test_a_killed_replica_leaves_no_segment_behind() -> None:
    handle = serve.run(Store.bind())
    a = np.ones(BIG, dtype=np.uint8)
    held = [handle.hold.remote(a) for _ in range(3)]  # lent to the replica, in flight
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 3, message="three lent segments")
    (pid,) = replica_pids()
    os.kill(pid, signal.SIGKILL)
    for response in held:
        with pytest.raises(Exception):
            response.result(timeout_s=30)
    # Nothing is lent any more, and the segments lent to the dead replica are gone
    # (never reused: only free, reusable segments stay mapped here).
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 0, message="no lent segment")
    stats = shared_memory.pool.statistics()
    assert stats["segments"] == stats["free"]
    assert _memfd_mappings() <= stats["segments"]


def test_a_cancelled_request_gives_its_segment_back() -> None:
    handle = serve.run(Store.bind())
    response = handle.hold_async.remote(np.ones(BIG, dtype=np.uint8))
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 1, message="the lent segment")
    response.cancel()
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=30)
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 0,
             message="the replica to release the cancelled request's segment")


def test_values_held_by_the_replica_stay_lent_until_dropped() -> None:
    handle = serve.run(Store.bind())
    first = [handle.hold.remote(np.full(BIG, i, dtype=np.uint8)) for i in range(2)]
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 2, message="two lent segments")
    handle.release.remote().result(timeout_s=30)
    assert [r.result(timeout_s=30) for r in first] == [BIG, BIG]
    assert shared_memory.pool.statistics()["lent"] == 2  # the replica keeps them
    assert handle.drop.remote().result() == 2
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 0, message="released segments")


def test_mutating_an_argument_after_remote_does_not_reach_the_replica() -> None:
    handle = serve.run(Store.bind())
    for size in (1000, BIG):  # inline and in shared memory
        a = np.ones(size, dtype=np.uint8)
        response = handle.checksum.remote(a)  # from a sync caller: sent by another thread
        a[:] = 7
        assert response.result() == size
        buf = bytearray(b"a" * size)
        response = handle.describe.remote(buf)
        buf[:] = b"b" * size
        assert response.result() == ("bytearray", size, _sha1(b"a" * size))


async def test_a_queued_request_keeps_its_arguments_as_they_were(tmp_path: Path) -> None:
    handle = serve.run(Store.options(max_ongoing_requests=1).bind())
    gate = tmp_path / "gate"
    blocker = handle.hold_until.remote(str(gate))  # takes the only slot
    a = np.ones(BIG, dtype=np.uint8)
    queued = handle.checksum.remote(a)  # waits in the router for the slot
    a[:] = 3
    gate.touch()
    assert await blocker is True
    assert await queued == BIG


class Unpicklable:
    def __reduce_ex__(self, protocol: Any) -> Any:
        raise RuntimeError("no pickling for you")


def test_an_object_whose_reduce_ex_raises_keeps_the_clear_error() -> None:
    handle = serve.run(Store.bind())
    with pytest.raises(TypeError, match=r"argument 0 \(Unpicklable\).*no pickling for you"):
        handle.echo.remote(Unpicklable()).result()

    async def from_a_loop() -> None:
        with pytest.raises(TypeError, match=r"argument 0 \(Unpicklable\).*no pickling for you"):
            await handle.echo.remote(Unpicklable())

    asyncio.run(from_a_loop())


def test_cpu_tensors_cross_in_shared_memory() -> None:
    torch = pytest.importorskip("torch")
    handle = serve.run(Store.bind())
    t = torch.arange(BIG // 4, dtype=torch.float32)
    back = handle.echo.remote(t).result()
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)
    wait_for(lambda: shared_memory.pool.statistics()["lent"] == 0, message="segments back")
