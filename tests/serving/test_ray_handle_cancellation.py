"""Ray Serve's test_handle_cancellation.py, ported by meaning: ``response.cancel()`` while
a request runs or waits for a replica, from the driver and from a replica, for unary and
streaming calls, and what it must not cancel.

Skipped: the check of Ray's private ``_requests_pending_assignment`` cache (the
user-visible half, that a cancelled queued request never runs, is checked).
"""

from __future__ import annotations

from typing import Any

import pytest

from ladle import serve
from ladle.exceptions import RequestCancelledError
from ladle.handle import DeploymentHandle
from tests.serving.signals import (
    Signal,
    async_wait_for_waiters,
    send_when_cancelled,
    wait_for_waiters,
)


@serve.deployment
class Cancellable:
    def __init__(self, running: DeploymentHandle, cancelled: DeploymentHandle) -> None:
        self._running = running
        self._cancelled = cancelled

    async def __call__(self) -> None:
        await send_when_cancelled(self._cancelled, started=self._running)

    async def stream(self) -> Any:
        yield "hi"
        await send_when_cancelled(self._cancelled)


@serve.deployment
class Canceller:
    """The driver's cancellations, made from inside a replica."""

    def __init__(self, downstream: DeploymentHandle, running: DeploymentHandle,
                 cancelled: DeploymentHandle) -> None:
        self._h = downstream
        self._running = running
        self._cancelled = cancelled

    async def unary(self) -> str:
        response = self._h.remote()
        await self._running.wait.remote()
        response.cancel()
        await self._cancelled.wait.remote()
        try:
            await response
        except RequestCancelledError:
            return "RequestCancelledError"
        return "not cancelled"

    async def stream(self) -> list[str]:
        gen = self._h.options(stream=True).stream.remote()
        seen = [await gen.__anext__()]
        gen.cancel()
        try:
            await gen.__anext__()
        except RequestCancelledError:
            seen.append("RequestCancelledError")
        await self._cancelled.wait.remote()
        return seen


def _app() -> Any:
    running, cancelled = Signal.options(name="running").bind(), Signal.options(
        name="cancelled").bind()
    return Canceller.bind(Cancellable.bind(running, cancelled), running, cancelled)


def test_cancel_while_running_from_the_driver_and_from_a_replica() -> None:
    canceller = serve.run(_app())
    downstream = serve.get_deployment_handle("Cancellable", "default")
    running = serve.get_deployment_handle("running", "default")
    cancelled = serve.get_deployment_handle("cancelled", "default")

    response = downstream.remote()
    running.wait.remote().result(timeout_s=15)
    response.cancel()
    cancelled.wait.remote().result(timeout_s=15)  # the replica saw the cancellation
    with pytest.raises(RequestCancelledError):
        response.result()

    gen = downstream.options(stream=True).stream.remote()
    assert next(gen) == "hi"
    gen.cancel()
    with pytest.raises(RequestCancelledError):
        next(gen)
    cancelled.wait.remote().result(timeout_s=15)

    for signal in (running, cancelled):
        signal.send.remote(clear=True).result()
    assert canceller.unary.remote().result(timeout_s=30) == "RequestCancelledError"
    cancelled.send.remote(clear=True).result()
    assert canceller.stream.remote().result(timeout_s=30) == ["hi", "RequestCancelledError"]


@serve.deployment(max_ongoing_requests=1)
class Counter:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal
        self._count = 0

    async def __call__(self) -> int:
        self._count += 1
        await self._signal.wait.remote()
        return self._count

    def get_count(self) -> int:
        return self._count


@serve.deployment
class QueueingCaller:
    def __init__(self, counter: DeploymentHandle, signal: DeploymentHandle) -> None:
        self._h = counter
        self._signal = signal

    async def cancel_while_queued(self) -> list[Any]:
        first = self._h.remote()
        await async_wait_for_waiters(self._signal, 1)
        second = self._h.remote()  # waits here: the only slot is taken
        second.cancel()
        seen: list[Any] = []
        try:
            await second
        except RequestCancelledError:
            seen.append("RequestCancelledError")
        await self._signal.send.remote()
        seen.append(await first)
        seen += [await self._h.remote() for _ in range(3)]
        return seen

    async def leave_one_queued(self) -> str:
        # Not awaited: cancelling this request must cancel it too, still queued.
        self._h.remote()
        await self._signal.wait.remote()
        return "hi"

    async def get_count(self) -> int:
        return await self._h.get_count.remote()


def test_cancel_while_waiting_for_a_replica() -> None:
    signal_app = Signal.bind()
    caller = serve.run(QueueingCaller.bind(Counter.bind(signal_app), signal_app))
    counter = serve.get_deployment_handle("Counter", "default")
    signal = serve.get_deployment_handle("Signal", "default")

    # From the driver: the cancelled call never reaches the replica.
    first = counter.remote()
    wait_for_waiters(signal, 1)
    second = counter.remote()
    second.cancel()
    with pytest.raises(RequestCancelledError):
        second.result()
    signal.send.remote().result()
    assert first.result() == 1
    assert [counter.remote().result() for _ in range(3)] == [2, 3, 4]

    # From a replica, the same.
    signal.send.remote(clear=True).result()  # later calls don't block
    assert caller.cancel_while_queued.remote().result(timeout_s=30) == [
        "RequestCancelledError", 5, 6, 7, 8]

    # Cancelling a request cancels the requests it left queued downstream.
    signal.send.remote(clear=True).result()
    count = counter.get_count.remote().result()
    occupied = counter.remote()  # takes the only slot
    wait_for_waiters(signal, 1)
    outer1 = caller.leave_one_queued.remote()
    wait_for_waiters(signal, 2)
    outer2 = caller.leave_one_queued.remote()
    wait_for_waiters(signal, 3)
    outer2.cancel()
    signal.send.remote().result()
    assert outer1.result(timeout_s=30) == "hi"
    assert occupied.result(timeout_s=30) == count + 1
    with pytest.raises(RequestCancelledError):
        outer2.result()
    # outer1's queued call ran; outer2's never did.
    assert counter.get_count.remote().result() == count + 2
    assert caller.get_count.remote().result() == count + 2


@serve.deployment
class Sleeper:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    async def __call__(self) -> str:
        await self._signal.wait.remote()
        return "ok"

    async def hi(self) -> str:
        await self._signal.wait.remote()
        return "ok"


@serve.deployment
class OutOfBand:
    def __init__(self, sleeper: DeploymentHandle) -> None:
        self._h = sleeper
        self._out_of_band = sleeper.hi.remote()  # made outside any request

    async def __call__(self) -> None:
        await self._h.hi.remote()

    async def get_out_of_band_response(self) -> str:
        return await self._out_of_band


def test_cancellation_touches_only_its_own_request() -> None:
    sleeper_app = Sleeper.bind(Signal.bind())
    handle = serve.run(OutOfBand.bind(sleeper_app))
    sleeper = serve.get_deployment_handle("Sleeper", "default")
    signal = serve.get_deployment_handle("Signal", "default")

    r1, r2 = sleeper.remote(), sleeper.remote()
    wait_for_waiters(signal, 3)  # two calls and the constructor's
    r1.cancel()
    with pytest.raises(RequestCancelledError):
        r1.result()

    # A call made by a request is cancelled with it; one made in __init__ is not.
    outer = handle.remote()
    wait_for_waiters(signal, 3)
    outer.cancel()
    with pytest.raises(RequestCancelledError):
        outer.result()
    wait_for_waiters(signal, 2)
    signal.send.remote().result()
    assert r2.result() == "ok"
    assert handle.get_out_of_band_response.remote().result() == "ok"


@serve.deployment
async def inner(cancelled: DeploymentHandle) -> None:
    await send_when_cancelled(cancelled)


@serve.deployment
class Outer:
    def __init__(self, inner: DeploymentHandle, inner_cancelled: DeploymentHandle,
                 outer_cancelled: DeploymentHandle) -> None:
        self._inner = inner
        self._inner_cancelled = inner_cancelled
        self._outer_cancelled = outer_cancelled

    async def __call__(self) -> None:
        self._inner.remote(self._inner_cancelled)  # not awaited
        await send_when_cancelled(self._outer_cancelled)


def test_cancelling_a_request_cancels_what_it_started() -> None:
    handle = serve.run(Outer.bind(inner.bind(), Signal.options(name="inner_cancelled").bind(),
                                  Signal.options(name="outer_cancelled").bind()))
    response = handle.remote()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.5)
    response.cancel()
    for name in ("inner_cancelled", "outer_cancelled"):
        serve.get_deployment_handle(name, "default").wait.remote().result(timeout_s=15)
