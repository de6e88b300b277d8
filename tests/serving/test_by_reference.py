"""DeploymentResponses nested in another call's arguments are passed by reference.

Ray Serve's documented rule ("model composition: pass a DeploymentResponse by
reference"): the downstream call starts at once and receives an ObjectRef it
awaits (or ``ladle.get``s) for the upstream value.  (Ray 2.60 itself refuses
them, see docs/behaviour.md.)
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import ladle
from ladle import serve
from ladle.exceptions import RayServeException
from ladle.handle import DeploymentHandle, DeploymentResponse
from tests.serving.signals import Signal


class UpstreamError(Exception):
    pass


@dataclass
class Wrapped:
    ref: Any


@serve.deployment
class Preprocessor:
    def __init__(self, release: DeploymentHandle) -> None:
        self._release = release

    async def __call__(self, text: str = "Hello from preprocessor!") -> str:
        await self._release.wait.remote()
        return text

    def fail(self) -> str:
        raise UpstreamError("upstream broke")


@serve.deployment
class DownstreamModel:
    def __init__(self, started: DeploymentHandle, again: DeploymentHandle) -> None:
        self._started = started
        self._again = again
        self._kept: Any = None

    def pass_by_value(self, result: str) -> str:
        return f"Got result by value: '{result}'"

    async def pass_by_reference(self, wrapped: list[ladle.ObjectRef]) -> str:
        # Runs before the upstream value exists: this releases the upstream.
        await self._started.send.remote()
        result: str = await wrapped[0]
        assert await wrapped[0] == result  # awaited again: the same value
        return f"Got result by reference: '{result}'"

    def kind(self, wrapped: list[Any]) -> str:
        return type(wrapped[0]).__name__

    async def in_a_dict(self, by_key: dict[str, Any], obj: Wrapped) -> list[Any]:
        return [await by_key["x"], await obj.ref]

    def sync_get(self, refs: list[Any]) -> list[Any]:
        # A sync method (a worker thread): ladle.get, as ray.get.
        ready, _ = ladle.wait(refs, num_returns=len(refs), timeout=30)
        assert len(ready) == len(refs)
        return ladle.get(refs, timeout=30)

    async def failing(self, refs: list[Any]) -> str:
        try:
            await refs[0]
        except UpstreamError as exc:
            return f"UpstreamError: {exc}"
        return "no error"

    async def pass_on(self, refs: list[Any]) -> list[Any]:
        # A received reference passed on: at the top level it is resolved first,
        # nested it goes by reference again.
        return [await self._again.echo.remote(refs[0]),
                await self._again.unwrap.remote([refs[0]])]

    async def keep(self, refs: list[Any]) -> None:
        self._kept = refs[0]  # never awaited while its request runs

    async def await_kept(self) -> str:
        try:
            await self._kept
        except RayServeException as exc:
            return str(exc)
        return "resolved"


@serve.deployment
class Again:
    def echo(self, value: Any) -> Any:
        assert not isinstance(value, ladle.ObjectRef)
        return value

    async def unwrap(self, refs: list[Any]) -> Any:
        return await refs[0]


@serve.deployment
class Ingress:
    def __init__(self, preprocessor: DeploymentHandle, downstream: DeploymentHandle) -> None:
        self._preprocessor = preprocessor
        self._downstream = downstream

    async def __call__(self, mode: str) -> str:
        response: DeploymentResponse = self._preprocessor.remote()
        if mode == "by_value":
            return await self._downstream.pass_by_value.remote(response)
        return await self._downstream.pass_by_reference.remote([response])


def _app() -> Any:
    release = Signal.options(name="release").bind()
    return Ingress.bind(Preprocessor.bind(release), DownstreamModel.bind(release, Again.bind()))


def test_passed_by_reference() -> None:
    handle = serve.run(_app())
    signal = serve.get_deployment_handle("release", "default")
    pre = serve.get_deployment_handle("Preprocessor", "default")
    down = serve.get_deployment_handle("DownstreamModel", "default")

    # Ray's example.  By reference, the downstream runs first and releases the
    # upstream itself; by value, it waits for the upstream's value.
    assert handle.remote(mode="by_reference").result(timeout_s=30) == (
        "Got result by reference: 'Hello from preprocessor!'")
    assert down.kind.remote([pre.remote()]).result(timeout_s=30) == "ObjectRef"

    # A reference lives as long as its request: kept past it, it never gets a value.
    blocked = pre.remote("late")
    down.keep.remote([blocked]).result(timeout_s=30)  # done before the value exists
    assert "finished before the value arrived" in down.await_kept.remote().result(timeout_s=30)
    signal.send.remote().result()
    assert blocked.result(timeout_s=30) == "late"
    assert handle.remote(mode="by_value").result(timeout_s=30) == (
        "Got result by value: 'Hello from preprocessor!'")

    # From sync code, in a dict and inside a dataclass.
    assert down.in_a_dict.remote({"x": pre.remote("a")}, Wrapped(pre.remote("b"))).result(
        timeout_s=30) == ["a", "b"]
    # ladle.get / ladle.wait in a sync method; one response nested twice.
    twice = pre.remote("c")
    assert down.sync_get.remote([twice, pre.remote("d"), twice]).result(timeout_s=30) == [
        "c", "d", "c"]
    # The upstream's error, with its own class.
    assert down.failing.remote([pre.fail.remote()]).result(timeout_s=30) == (
        "UpstreamError: upstream broke")
    # Passed on by the receiver.
    assert down.pass_on.remote([pre.remote("e")]).result(timeout_s=30) == ["e", "e"]

    async def from_a_loop() -> list[Any]:
        return await down.in_a_dict.remote({"x": pre.remote("f")}, Wrapped(pre.remote("g")))

    assert asyncio.run(from_a_loop()) == ["f", "g"]


def test_local_testing_mode_passes_the_response_itself() -> None:
    # Nothing is serialized in local testing mode: the receiver gets the response
    # itself, which it awaits the same way.
    handle = serve.run(_app(), _local_testing_mode=True)
    assert handle.remote(mode="by_reference").result(timeout_s=30) == (
        "Got result by reference: 'Hello from preprocessor!'")
    down = serve.get_deployment_handle("DownstreamModel", "default")
    pre = serve.get_deployment_handle("Preprocessor", "default")
    assert down.kind.remote([pre.remote()]).result(timeout_s=30) == "DeploymentResponse"
