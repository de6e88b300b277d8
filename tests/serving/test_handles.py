"""DeploymentHandle and DeploymentResponse against real replicas: methods, loops, threads."""

from __future__ import annotations

import asyncio
import os
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ladle import serve
from ladle.handle import DeploymentHandle, DeploymentResponse


@serve.deployment
class Model:
    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, x: int) -> int:
        return x * self.scale

    async def predict(self, x: int) -> int:
        await asyncio.sleep(0)
        return x + self.scale

    def describe(self, x: int, *, suffix: str = "") -> str:
        return f"{x}{suffix}"

    def thread_has_loop(self) -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True


def test_method_selection_three_ways_sync_and_async() -> None:
    handle = serve.run(Model.bind(3), name="default", route_prefix="/")
    assert isinstance(handle, DeploymentHandle)

    response = handle.remote(2)
    assert isinstance(response, DeploymentResponse)
    assert response.result() == 6                                  # __call__ (sync)
    assert handle.predict.remote(2).result() == 5                  # attribute (async)
    assert handle.options(method_name="predict").remote(4).result() == 7
    assert handle.options(method_name="__call__").remote(4).result() == 12
    assert handle.describe.remote(1, suffix="!").result() == "1!"
    assert handle.options(method_name="describe").remote(x=2).result() == "2"
    # Sync methods run off the replica's event loop.
    assert handle.thread_has_loop.remote().result() is False
    # options() returns a new handle: the original still calls __call__.
    by_name = handle.options(method_name="predict")
    assert by_name is not handle
    assert handle.remote(1).result() == 3
    assert by_name.remote(1).result() == 4


def test_function_deployments_sync_and_async() -> None:
    @serve.deployment
    def double(x: int) -> int:
        return 2 * x

    @serve.deployment
    async def greet(name: str, punctuation: str = ".") -> str:
        await asyncio.sleep(0)
        return f"hello {name}{punctuation}"

    sync_handle = serve.run(double.bind(), name="sync_fn", route_prefix=None)
    async_handle = serve.run(greet.bind(), name="async_fn", route_prefix=None)
    assert sync_handle.remote(21).result() == 42
    assert async_handle.remote("ladle", punctuation="!").result() == "hello ladle!"
    assert async_handle.options(method_name="__call__").remote("x").result() == "hello x."

    async def from_loop() -> tuple[int, str]:
        return await sync_handle.remote(5), await async_handle.remote("loop")

    assert asyncio.run(from_loop()) == (10, "hello loop.")


@serve.deployment
class Gate:
    """A method that blocks on an event, released by another call."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self) -> str:
        await self.event.wait()
        return "released"

    async def release(self) -> None:
        self.event.set()


def test_result_timeout_then_result() -> None:
    handle = serve.run(Gate.bind())
    blocked = handle.wait.remote()
    with pytest.raises(TimeoutError):
        blocked.result(timeout_s=0.2)
    # A timeout does not cancel the request: it still completes once released.
    assert not blocked.cancelled()
    handle.release.remote().result(timeout_s=10)
    assert blocked.result(timeout_s=10) == "released"
    # A finished result is returned again, with or without a timeout.
    assert blocked.result() == "released"
    assert blocked.result(timeout_s=0) == "released"


def test_result_inside_running_loop_raises_runtime_error() -> None:
    handle = serve.run(Model.bind(2))

    async def main() -> int:
        response = handle.remote(5)
        with pytest.raises(RuntimeError, match="await"):
            response.result()
        return await response  # the response is still usable by awaiting

    assert asyncio.run(main()) == 10


def test_await_from_driver_loop_and_second_loop_in_thread() -> None:
    handle = serve.run(Model.bind(10))

    async def use(h: DeploymentHandle, base: int) -> list[int]:
        results = await asyncio.gather(*[h.remote(base + i) for i in range(5)])
        results.append(await h.predict.remote(base))
        return results

    # The driver's own asyncio.run loop.
    assert asyncio.run(use(handle, 0)) == [0, 10, 20, 30, 40, 10]

    # Two more loops, each in its own thread, using the same handle object at once.
    outputs: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def in_thread(base: int) -> None:
        try:
            outputs[base] = asyncio.run(use(handle, base))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(b,)) for b in (100, 200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert outputs == {100: [1000, 1010, 1020, 1030, 1040, 110],
                       200: [2000, 2010, 2020, 2030, 2040, 210]}

    # A response created outside any loop can be awaited inside one.
    outside = handle.remote(7)
    assert asyncio.run(_await(outside)) == 70

    # One created in a loop that keeps running in another thread can be awaited
    # in the driver's loop.
    other = _LoopThread()
    try:
        async def make() -> DeploymentResponse:
            return handle.remote(8)

        made_elsewhere = asyncio.run_coroutine_threadsafe(make(), other.loop).result(10)
        assert asyncio.run(_await(made_elsewhere)) == 80
    finally:
        other.stop()
    # Sync calls still work after those loops ended.
    assert handle.remote(9).result() == 90


class _LoopThread:
    """An event loop running in its own thread until stop()."""

    def __init__(self) -> None:
        started = threading.Event()
        self._stop: asyncio.Event | None = None

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started.set()
            await self._stop.wait()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),))
        self._thread.start()
        assert started.wait(10)

    def stop(self) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


async def _await(response: DeploymentResponse) -> int:
    value: int = await response
    return value


@serve.deployment
class Downstream:
    def __call__(self, x: int) -> int:
        return x + 1

    async def whoami(self, _: object = None) -> int:
        return os.getpid()


@serve.deployment
class Ingress:
    def __init__(self, downstream: DeploymentHandle) -> None:
        self.downstream = downstream

    async def __call__(self, x: int) -> int:
        # Awaiting inside a deployment's loop.
        return await self.downstream.remote(x) * 2

    async def handle_type(self) -> str:
        return type(self.downstream).__name__

    async def call_with(self, handle: DeploymentHandle, x: int) -> tuple[int, str]:
        # A handle that arrived as an argument of .remote().
        return await handle.remote(x), type(handle).__name__

    def many_threads(self, n: int) -> list[int]:
        # A sync method (outside any loop): the pickled handle from 8 threads.
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda i: self.downstream.remote(i).result(timeout_s=30),
                                 range(n)))

    async def many_tasks(self, n: int) -> list[int]:
        return list(await asyncio.gather(*[self.downstream.remote(i) for i in range(n)]))

    async def pid(self) -> int:
        return os.getpid()


def test_handles_pickled_into_deployments_via_bind_and_argument() -> None:
    ingress = serve.run(Ingress.bind(Downstream.bind()))
    assert ingress.handle_type.remote().result() == "DeploymentHandle"
    assert ingress.remote(4).result() == 10

    downstream = serve.get_deployment_handle("Downstream", "default")
    assert downstream.remote(1).result() == 2
    # Passing a handle as an argument of .remote(): it is pickled to the replica.
    assert ingress.call_with.remote(downstream, 41).result() == (42, "DeploymentHandle")
    # With options carried along.
    value, _ = ingress.call_with.remote(downstream.options(method_name="whoami"), 0).result()
    assert value == downstream.whoami.remote().result()
    assert value != ingress.pid.remote().result() != os.getpid()
    # A handle pickled in the driver works too.
    copy = pickle.loads(pickle.dumps(ingress))
    assert copy.remote(0).result() == 2


def test_handles_used_from_many_threads_in_driver_and_replica() -> None:
    ingress = serve.run(Ingress.bind(Downstream.bind()))
    downstream = serve.get_deployment_handle("Downstream", "default")
    pickled = pickle.loads(pickle.dumps(downstream))

    # 200 calls from 8 driver threads, half through the original handle and
    # half through a pickled copy.
    def call(i: int) -> int:
        h = downstream if i % 2 else pickled
        return h.remote(i).result(timeout_s=30)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(call, range(200))) == [i + 1 for i in range(200)]

    # The handle pickled into the ingress via bind, used from 8 threads there.
    assert ingress.many_threads.remote(200).result(timeout_s=30) == [i + 1 for i in range(200)]
    assert ingress.many_tasks.remote(200).result(timeout_s=30) == [i + 1 for i in range(200)]
