"""DeploymentResponses passed to other calls: chains, fan-out, nesting, upstream failures."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import ladle
from ladle import serve
from ladle.handle import DeploymentHandle


class UpstreamError(Exception):
    pass


@serve.deployment
class Add:
    def __call__(self, x: int, y: int = 1) -> int:
        if not isinstance(x, int) or not isinstance(y, int):
            raise TypeError(f"Add got unresolved arguments: {type(x)}, {type(y)}")
        return x + y

    def fail(self, message: str) -> int:
        raise UpstreamError(message)


@serve.deployment
class Mul:
    async def __call__(self, x: int, factor: int = 2) -> int:
        if not isinstance(x, int) or not isinstance(factor, int):
            raise TypeError(f"Mul got unresolved arguments: {type(x)}, {type(factor)}")
        return x * factor


@serve.deployment
class Collect:
    def __init__(self, add: DeploymentHandle, mul: DeploymentHandle) -> None:
        self.add = add
        self.mul = mul

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        return list(args), kwargs

    async def chain(self, x: int) -> int:
        # Composition inside a deployment: nothing is awaited until the end.
        return await self.mul.remote(self.add.remote(self.mul.remote(x), y=10), factor=3)

    async def fan_out(self, n: int) -> tuple[list[Any], dict[str, Any]]:
        me = serve.get_deployment_handle("Collect", "default")
        return await me.remote(*[self.add.remote(i) for i in range(n)],
                               total=self.mul.remote(n))

    async def resolve(self, *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
        async def value(v: Any) -> Any:
            if isinstance(v, ladle.ObjectRef):
                return await v
            if isinstance(v, list):
                return [await value(x) for x in v]
            if isinstance(v, dict):
                return {k: await value(x) for k, x in v.items()}
            return v
        return await value(list(args)), await value(kwargs)

    async def forward_failure(self, message: str) -> int:
        return await self.mul.remote(self.add.fail.remote(message))


@pytest.fixture
def handles() -> tuple[DeploymentHandle, DeploymentHandle, DeploymentHandle]:
    collect = serve.run(Collect.bind(Add.bind(), Mul.bind()))
    return (collect, serve.get_deployment_handle("Add", "default"),
            serve.get_deployment_handle("Mul", "default"))


def test_chain_of_depth_three_and_keyword_arguments(handles: Any) -> None:
    collect, add, mul = handles
    # c(x) -> b(...) -> a(...), without awaiting any intermediate response.
    response = collect.remote(mul.remote(add.remote(5), factor=add.remote(2)))
    assert response.result(timeout_s=10) == ([18], {})
    assert mul.remote(add.remote(mul.remote(add.remote(0)))).result(timeout_s=10) == 6
    # Keyword arguments are resolved too, mixed with plain values.
    assert add.remote(x=mul.remote(4), y=add.remote(1, y=2)).result(timeout_s=10) == 11
    # The same response passed twice, and reused after resolution.
    shared = add.remote(1)
    assert collect.remote(shared, shared, k=shared).result(timeout_s=10) == ([2, 2], {"k": 2})
    assert shared.result() == 2


def test_fan_out_of_ten(handles: Any) -> None:
    collect, add, mul = handles
    responses = [add.remote(i, y=100) for i in range(10)]
    args, kwargs = collect.remote(*responses, last=mul.remote(7)).result(timeout_s=10)
    assert args == [100 + i for i in range(10)]
    assert kwargs == {"last": 14}


def test_passing_responses_inside_a_deployment(handles: Any) -> None:
    collect, _, _ = handles
    assert collect.chain.remote(2).result(timeout_s=10) == (2 * 2 + 10) * 3
    args, kwargs = collect.fan_out.remote(10).result(timeout_s=10)
    assert args == [i + 1 for i in range(10)]
    assert kwargs == {"total": 20}


async def test_passing_responses_in_the_drivers_loop(handles: Any) -> None:
    collect, add, mul = handles
    chained = mul.remote(add.remote(mul.remote(3)))
    assert await chained == 14
    args, _ = await collect.remote(*[add.remote(i) for i in range(10)])
    assert args == list(range(1, 11))


def test_response_nested_in_list_or_dict_is_passed_by_reference(handles: Any) -> None:
    collect, add, _ = handles
    upstream = add.remote(1)
    assert collect.resolve.remote([upstream], key={"nested": upstream}).result(
        timeout_s=10) == ([[2]], {"key": {"nested": 2}})
    # Returned as it came, a reference cannot leave the replica: it stands for a
    # value the request carries, not for one the caller could fetch.
    with pytest.raises(TypeError, match="`ObjectRef` is not serializable"):
        collect.remote([upstream]).result(timeout_s=10)
    # The upstream response itself is unaffected.
    assert upstream.result(timeout_s=10) == 2


def test_upstream_failure_fails_the_downstream_call(handles: Any) -> None:
    collect, add, mul = handles
    downstream = mul.remote(add.fail.remote("upstream broke"))
    with pytest.raises(UpstreamError, match="upstream broke"):
        downstream.result(timeout_s=10)
    # Through a chain, a keyword argument and a fan-out.
    with pytest.raises(UpstreamError, match="deep"):
        mul.remote(add.remote(add.fail.remote("deep"))).result(timeout_s=10)
    with pytest.raises(UpstreamError, match="kw"):
        collect.remote(1, x=add.fail.remote("kw")).result(timeout_s=10)
    ok = [add.remote(i) for i in range(5)]
    with pytest.raises(UpstreamError, match="one of many"):
        collect.remote(*ok, add.fail.remote("one of many")).result(timeout_s=10)
    # Inside a deployment too.
    with pytest.raises(UpstreamError, match="inside"):
        collect.forward_failure.remote("inside").result(timeout_s=10)

    async def awaited() -> None:
        with pytest.raises(UpstreamError, match="awaited"):
            await mul.remote(add.fail.remote("awaited"))

    asyncio.run(awaited())
