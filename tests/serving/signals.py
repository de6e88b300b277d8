"""A signal that replicas and the driver wait on: a deployment, so it works across processes.

The tests' stand-in for Ray's ``SignalActor``: ``wait()`` blocks until
``send()``; ``num_waiters()`` says how many calls are blocked, so a test can
wait for "the request is running" as a condition instead of sleeping.
``Waiter`` releases blocked calls one at a time.
"""

from __future__ import annotations

import asyncio

from ladle import serve
from ladle.handle import DeploymentHandle
from tests.conftest import wait_for


@serve.deployment(max_ongoing_requests=1000)
class Signal:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiters = 0

    async def wait(self) -> None:
        self._waiters += 1
        try:
            await self._event.wait()
        finally:
            self._waiters -= 1

    # async: sync methods run in worker threads, and asyncio.Event is not thread-safe.
    async def send(self, clear: bool = False) -> None:
        self._event.set()
        if clear:
            self._event = asyncio.Event()

    async def num_waiters(self) -> int:
        return self._waiters


@serve.deployment(max_ongoing_requests=1000)
class Waiter:
    """Each ``wait()`` blocks until one ``unblock_one()`` releases it (latest first)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Event] = []

    async def wait(self) -> None:
        event = asyncio.Event()
        self._waiters.append(event)
        await event.wait()

    async def unblock_one(self) -> None:
        self._waiters.pop().set()

    async def num_waiters(self) -> int:
        return len(self._waiters)


def wait_for_waiters(signal: DeploymentHandle, n: int, timeout_s: float = 15.0) -> None:
    """Block (in the driver) until ``n`` calls are waiting on ``signal``."""
    wait_for(lambda: signal.num_waiters.remote().result(timeout_s=timeout_s) == n,
             timeout_s=timeout_s, message=f"{n} waiters on the signal")


async def async_wait_for_waiters(signal: DeploymentHandle, n: int,
                                 timeout_s: float = 15.0) -> None:
    """The same, from inside a deployment (polls without blocking the loop)."""
    async with asyncio.timeout(timeout_s):
        while await signal.num_waiters.remote() != n:
            await asyncio.sleep(0.01)


async def send_when_cancelled(signal: DeploymentHandle,
                              started: DeploymentHandle | None = None) -> None:
    """Wait until cancelled, then ``send()`` on ``signal`` (Ray's
    ``send_signal_on_cancellation``): the test's proof the cancellation arrived.
    ``started`` is sent first, from inside the wait, so a cancellation that follows
    it always lands here."""
    try:
        if started is not None:
            await started.send.remote()
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await signal.send.remote()
        raise
