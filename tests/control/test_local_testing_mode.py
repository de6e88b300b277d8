"""``_local_testing_mode=True``: the same behaviour with everything in the calling process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import psutil
import pytest

from ladle import serve
from ladle.exceptions import RayServeException


class ModelError(Exception):
    """A user exception: it must reach the caller as itself."""


@serve.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return x * 2

    def fail(self, message: str) -> None:
        raise ModelError(message)


@serve.deployment(user_config={"offset": 1})
class Ingress:
    def __init__(self, doubler: Any) -> None:
        self.doubler = doubler
        self.offset = 0
        self.reconfigured: list[Any] = []

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.offset = user_config["offset"]
        self.reconfigured.append(user_config)

    async def __call__(self, x: int) -> int:
        return await self.doubler.remote(x) + self.offset

    def where(self) -> tuple[int, int, str, str]:
        ctx = serve.get_replica_context()
        return os.getpid(), id(self), ctx.app_name, ctx.deployment

    async def state(self) -> tuple[int, list[Any]]:
        return self.offset, self.reconfigured

    async def fail(self, message: str) -> None:
        await self.doubler.fail.remote(message)

    async def lookup(self, x: int) -> int:
        return await serve.get_deployment_handle("Doubler").remote(x)

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def acount(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i * 10


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_everything_runs_in_the_calling_process() -> None:
    before = children()
    handle = serve.run(Ingress.bind(Doubler.bind()), name="local", _local_testing_mode=True)

    # call, method, composition
    assert handle.remote(5).result(timeout_s=10) == 11
    pid, obj_id, app, deployment = handle.where.remote().result(timeout_s=10)
    assert (pid, app, deployment) == (os.getpid(), "local", "Ingress")
    assert handle.lookup.remote(4).result(timeout_s=10) == 8
    assert serve.get_deployment_handle("Doubler", "local").remote(3).result(timeout_s=10) == 6

    # streaming, sync and async generators
    assert list(handle.options(stream=True).count.remote(4)) == [0, 1, 2, 3]
    assert list(handle.options(stream=True).acount.remote(3)) == [0, 10, 20]

    # a user exception arrives as its own class
    with pytest.raises(ModelError, match="bad input"):
        handle.fail.remote("bad input").result(timeout_s=10)

    # reconfigure after __init__, then in place on a user_config change
    assert handle.state.remote().result(timeout_s=10) == (1, [{"offset": 1}])
    handle = serve.run(Ingress.options(user_config={"offset": 100}).bind(Doubler.bind()),
                       name="local", _local_testing_mode=True)
    assert handle.remote(5).result(timeout_s=10) == 110
    assert handle.state.remote().result(timeout_s=10) == (100, [{"offset": 1}, {"offset": 100}])
    assert handle.where.remote().result(timeout_s=10)[1] == obj_id  # the same object

    app_status = serve.status().applications["local"]
    assert app_status.status == "RUNNING"
    assert app_status.deployments["Ingress"].replica_states == {"RUNNING": 1}
    with pytest.raises(RayServeException, match="nope"):
        serve.get_app_handle("nope")
    assert children() == before


async def test_async_caller_in_local_testing_mode() -> None:
    before = children()
    handle = serve.run(Ingress.bind(Doubler.bind()), name="local", _local_testing_mode=True)
    assert await handle.remote(1) == 3
    assert [i async for i in handle.options(stream=True).acount.remote(2)] == [0, 10]
    with pytest.raises(ModelError, match="async bad"):
        await handle.fail.remote("async bad")
    assert children() == before


def test_constructor_error_in_local_testing_mode() -> None:
    def explode_locally() -> None:
        raise ValueError("local constructor failed")

    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            explode_locally()

    from ladle.exceptions import DeploymentFailedError

    with pytest.raises(DeploymentFailedError, match="local constructor failed") as info:
        serve.run(Broken.bind(), name="broken", _local_testing_mode=True)
    assert "explode_locally" in str(info.value)
    assert serve.status().applications["broken"].status == "DEPLOY_FAILED"
