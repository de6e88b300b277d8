"""The legacy 1.x API: deploy/get_handle/delete, ladle.get and ladle.wait.

``ray.get`` raises ``GetTimeoutError`` (a ``TimeoutError`` subclass) past its
timeout; ladle raises the builtin ``TimeoutError``, which catches the same.
"""

from __future__ import annotations

import asyncio
import gc

import pytest

import ladle
from ladle import serve
from ladle.exceptions import RayServeException


@serve.deployment
class Gate:
    """``wait`` blocks until ``open`` is called (one replica, so both land together)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()

    async def wait(self, value: str) -> str:
        await self._open.wait()
        return value

    async def open(self) -> None:
        self._open.set()

    def echo(self, value: object) -> object:
        return value

    def fail(self) -> None:
        raise KeyError("no such thing")


def test_get_values_lists_timeouts_and_errors() -> None:
    Gate.deploy()
    handle = Gate.get_handle()

    assert ladle.get(handle.echo.remote(1)) == 1
    assert ladle.get([handle.echo.remote(i) for i in range(5)]) == [0, 1, 2, 3, 4]
    assert ladle.get((handle.echo.remote("a"), handle.echo.remote("b"))) == ["a", "b"]
    assert ladle.get([]) == []

    # Past the timeout: TimeoutError, and the call keeps running (ray.get does
    # not cancel either), so its value is there once the gate opens.
    blocked = handle.wait.remote("late")
    with pytest.raises(TimeoutError):
        ladle.get(blocked, timeout=0.2)
    with pytest.raises(TimeoutError):
        ladle.get([handle.echo.remote("quick"), blocked], timeout=0.2)
    ladle.get(handle.open.remote())
    assert ladle.get(blocked, timeout=10) == "late"

    # A user exception re-raises as its own class.
    with pytest.raises(KeyError, match="no such thing"):
        ladle.get(handle.fail.remote())
    with pytest.raises(TypeError, match="ladle.get"):
        ladle.get("not a ref")


def test_wait_splits_ready_from_not_ready() -> None:
    Gate.deploy()
    handle = Gate.get_handle()

    blocked = handle.wait.remote("blocked")
    quick = [handle.echo.remote(i) for i in range(3)]
    refs = [quick[0], blocked, quick[1], quick[2]]

    # All three quick ones become ready; the blocked one times out.
    ready, not_ready = ladle.wait(refs, num_returns=4, timeout=0.3)
    assert ready == quick and not_ready == [blocked]

    # As in Ray: exactly num_returns refs come back ready, the rest (ready or
    # not) are in the second list, input order kept in both.
    ready, not_ready = ladle.wait(refs, num_returns=1)
    assert ready == [quick[0]]
    assert not_ready == [blocked, quick[1], quick[2]]
    ready, not_ready = ladle.wait(refs, num_returns=2)
    assert ready == [quick[0], quick[1]] and not_ready == [blocked, quick[2]]

    with pytest.raises(ValueError):
        ladle.wait(refs, num_returns=5)
    with pytest.raises(TypeError):
        ladle.wait(quick[0])

    ladle.get(handle.open.remote())
    ready, not_ready = ladle.wait(refs, num_returns=4, timeout=10)
    assert ready == refs and not_ready == []
    assert ladle.get(ready) == [0, "blocked", 1, 2]


def test_async_handle_in_asyncio_run() -> None:
    Gate.deploy()

    async def main() -> tuple[object, ...]:
        handle = Gate.get_handle(sync=False)
        ref = await handle.echo.remote("hi")       # await remote() -> a ref
        blocked_ref = await handle.wait.remote("later")
        other_ref = await handle.options(method_name="echo").remote(42)
        with pytest.raises(RuntimeError, match="await"):
            ladle.get(ref)                         # would block this loop
        await (await handle.open.remote())
        values = (await ref, await blocked_ref, await other_ref)
        with pytest.raises(KeyError):
            await (await handle.fail.remote())
        return values

    assert asyncio.run(main()) == ("hi", "later", 42)
    # The sync handle still works after that loop has ended.
    assert ladle.get(Gate.get_handle().echo.remote("after")) == "after"

    # The connections that loop opened were closed with it: nothing is left
    # for the garbage collector to warn about (warnings are errors here).
    serve.shutdown()
    gc.collect()


def test_deploy_route_prefix_redeploy_and_delete() -> None:
    @serve.deployment
    class Scaled:
        def __init__(self, scale: int) -> None:
            self.scale = scale

        def __call__(self, x: int) -> int:
            return x * self.scale

    @serve.deployment(route_prefix="/api")
    def hello(name: str) -> str:
        return f"Hello {name}!"

    Scaled.deploy(2)
    Scaled.options(name="Tripled").deploy(3)
    hello.deploy()

    apps = serve.status().applications
    # Each legacy deployment is its own application named after it, exposed at
    # `/{name}` unless it sets `route_prefix`.
    assert {name: app.route_prefix for name, app in apps.items()} == {
        "Scaled": "/Scaled", "Tripled": "/Tripled", "hello": "/api"}
    assert {name: str(app.status) for name, app in apps.items()} == dict.fromkeys(
        apps, "RUNNING")
    assert list(apps["Tripled"].deployments) == ["Tripled"]

    assert ladle.get(Scaled.get_handle().remote(5)) == 10
    assert ladle.get(Scaled.options(name="Tripled").get_handle().remote(5)) == 15
    assert ladle.get(hello.get_handle().remote("Bob")) == "Hello Bob!"

    # deploy() again updates in place.
    Scaled.deploy(10)
    assert ladle.get(Scaled.get_handle().remote(5)) == 50
    assert serve.status().applications["Scaled"].route_prefix == "/Scaled"

    Scaled.delete()
    assert "Scaled" not in serve.status().applications
    with pytest.raises(RayServeException):
        Scaled.get_handle()
    assert ladle.get(hello.get_handle().remote("Ann")) == "Hello Ann!"
