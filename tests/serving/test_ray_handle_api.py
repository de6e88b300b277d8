"""Ray Serve's test_handle_api.py, ported by meaning: handles and responses end to end.

Deployments report what they saw as return values; the test asserts in the
driver, so a failure shows the observation rather than a remote traceback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ladle import serve
from ladle.exceptions import HandleClosedError, RayServeException
from ladle.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from tests.serving.signals import Signal, Waiter, async_wait_for_waiters, wait_for_waiters

IN_LOOP = "should not be called from within an `asyncio` event loop"


@serve.deployment
def hello() -> str:
    return "hello"


@serve.deployment
def count_to_ten() -> Any:
    yield from range(10)


@serve.deployment
class Caller:
    """Calls ``hello`` (unary) and ``count_to_ten`` (a generator) from inside a replica."""

    def __init__(self, unary: DeploymentHandle, stream: DeploymentHandle) -> None:
        assert isinstance(unary, DeploymentHandle)
        self._unary = unary
        self._stream = stream.options(stream=True)

    async def __call__(self) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        response = self._unary.remote()
        seen["response_type"] = type(response).__name__
        value = await response
        # A response can be awaited again, and gives the same value.
        seen["awaited_again"] = [await response for _ in range(10)]
        seen["value"] = value
        # Blocking access inside a loop is refused, for unary and streaming calls.
        try:
            self._unary.remote().result()
        except RuntimeError as exc:
            seen["result_in_loop"] = str(exc)
        gen = self._stream.remote()
        seen["gen_type"] = type(gen).__name__
        try:
            for _ in gen:
                pass
        except RuntimeError as exc:
            seen["for_in_loop"] = str(exc)
        seen["async_for"] = [i async for i in self._stream.remote()]
        return seen

    async def relay(self) -> Any:
        # A generator method of the caller streaming a downstream stream.
        async for i in self._stream.remote():
            yield i

    async def dynamic_handles(self) -> tuple[str, str]:
        # Inside a replica the application defaults to the replica's own.
        by_name = serve.get_deployment_handle(deployment_name="hello")
        assert isinstance(by_name, DeploymentHandle)
        response = by_name.remote()
        assert isinstance(response, DeploymentResponse)
        return await response, await serve.get_deployment_handle("hello", "default").remote()


def test_responses_inside_and_outside_a_deployment() -> None:
    handle = serve.run(Caller.bind(hello.bind(), count_to_ten.bind()))
    assert isinstance(handle, DeploymentHandle)

    seen = handle.remote().result()
    assert seen["response_type"] == "DeploymentResponse"
    assert seen["value"] == "hello"
    assert seen["awaited_again"] == ["hello"] * 10
    assert IN_LOOP in seen["result_in_loop"]
    assert seen["gen_type"] == "DeploymentResponseGenerator"
    assert IN_LOOP in seen["for_in_loop"]
    assert seen["async_for"] == list(range(10))

    # Outside a deployment: `.result()` as often as wanted.
    response = serve.get_deployment_handle("hello", "default").remote()
    assert all(response.result() == "hello" for _ in range(10))

    # Streams, from the driver and relayed through the caller.
    gen = serve.get_deployment_handle("count_to_ten", "default").options(stream=True).remote()
    assert isinstance(gen, DeploymentResponseGenerator)
    assert list(gen) == list(range(10))
    relayed = handle.options(stream=True).relay.remote()
    assert isinstance(relayed, DeploymentResponseGenerator)
    assert list(relayed) == list(range(10))

    # get_app_handle and get_deployment_handle, from the driver and from a replica.
    app_handle = serve.get_app_handle("default")
    assert isinstance(app_handle, DeploymentHandle)
    assert app_handle.dynamic_handles.remote().result() == ("hello", "hello")
    assert serve.get_deployment_handle("hello", app_name="default").remote().result() == "hello"


@serve.deployment
class Blocked:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    async def __call__(self) -> str:
        await self._signal.wait.remote()
        return "hi"


def test_result_timeout() -> None:
    handle = serve.run(Blocked.bind(Signal.bind()))
    signal = serve.get_deployment_handle("Signal", "default")
    response = handle.remote()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.1)
    signal.send.remote().result()
    assert response.result() == "hi"


@serve.deployment
class Echo:
    def __init__(self, msg: str) -> None:
        self._msg = msg

    def __call__(self, inp: str) -> str:
        return f"{self._msg}|{inp}"

    def everything(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": args, "kwargs": kwargs}


@serve.deployment
class Composer:
    def __init__(self, first: DeploymentHandle, second: DeploymentHandle) -> None:
        self._first = first
        self._second = second

    async def by_args(self) -> str:
        return "driver|" + await self._first.remote(self._second.remote("hi"))

    async def by_kwargs(self) -> str:
        return "driver|" + await self._first.remote(inp=self._second.remote(inp="hi"))

    async def mixed(self) -> dict[str, Any]:
        return await self._first.everything.remote(
            "0", "100", self._second.everything.remote("1", "2", a="a", b="b"),
            x="x", y=self._second.everything.remote("3", "4", c="c", d="d"), z="z")


def test_compose_responses_inside_an_app_and_across_apps() -> None:
    handle = serve.run(Composer.bind(Echo.options(name="first").bind("first"),
                                     Echo.options(name="second").bind("second")))
    assert handle.by_args.remote().result() == "driver|first|second|hi"
    assert handle.by_kwargs.remote().result() == "driver|first|second|hi"
    mixed = handle.mixed.remote().result()
    assert mixed["args"] == ("0", "100", {"args": ("1", "2"), "kwargs": {"a": "a", "b": "b"}})
    assert mixed["kwargs"] == {"x": "x", "y": {"args": ("3", "4"),
                                               "kwargs": {"c": "c", "d": "d"}}, "z": "z"}

    # Composed in the driver, across two applications.
    app1 = serve.run(Echo.bind("app1"), name="app1", route_prefix="/app1")
    app2 = serve.run(Echo.bind("app2"), name="app2", route_prefix="/app2")
    assert app1.remote(app2.remote("hi")).result() == "app1|app2|hi"
    assert app1.remote(inp=app2.remote(inp="hi")).result() == "app1|app2|hi"


@serve.deployment
async def release_on_call(signal: DeploymentHandle) -> str:
    await signal.send.remote()
    return "downstream ran"


@serve.deployment
class Eager:
    def __init__(self, downstream: DeploymentHandle, started: DeploymentHandle,
                 downstream_ran: DeploymentHandle) -> None:
        self._downstream = downstream
        self._started = started
        self._downstream_ran = downstream_ran

    async def __call__(self) -> str:
        # Sent without being awaited: it must run anyway.
        response = self._downstream.remote(self._downstream_ran)
        await self._started.send.remote()
        await self._downstream_ran.wait.remote()
        return await response


def test_requests_are_sent_without_being_awaited() -> None:
    handle = serve.run(Eager.bind(release_on_call.bind(), Signal.options(name="started").bind(),
                                  Signal.options(name="downstream_ran").bind()))
    started = serve.get_deployment_handle("started", "default")
    # Nothing reads this response until the caller has started (and so has sent its own).
    response = handle.remote()
    started.wait.remote().result(timeout_s=15)
    assert response.result(timeout_s=15) == "downstream ran"


@serve.deployment(max_ongoing_requests=1)
class OneAtATime:
    def __init__(self, waiter: DeploymentHandle) -> None:
        self._waiter = waiter

    async def __call__(self) -> None:
        await self._waiter.wait.remote()


def test_max_ongoing_requests_is_enforced_for_handle_calls() -> None:
    handle = serve.run(OneAtATime.bind(Waiter.bind()))
    waiter = serve.get_deployment_handle("Waiter", "default")

    async def main() -> None:
        tasks = {asyncio.ensure_future(_await(handle.remote())) for _ in range(10)}
        while tasks:
            # Exactly one request runs at a time; the others wait their turn.
            await async_wait_for_waiters(waiter, 1)
            assert not any(t.done() for t in tasks)
            await waiter.unblock_one.remote()
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1

    asyncio.run(main())
    wait_for_waiters(waiter, 0)


async def _await(response: DeploymentResponse) -> Any:
    return await response


@serve.deployment
class Catcher:
    def __init__(self, downstream: DeploymentHandle) -> None:
        self._downstream = downstream

    async def __call__(self) -> str:
        # Not serializable on its own: a response is passed only through `.remote()`.
        import pickle

        try:
            pickle.dumps(self._downstream.remote("x"))
        except RayServeException as exc:
            return str(exc)
        return "pickled"


def test_a_response_does_not_pickle_outside_a_call() -> None:
    handle = serve.run(Catcher.bind(Echo.bind("e")))
    assert "DeploymentResponse" in handle.remote().result()


def test_response_and_handle_fields() -> None:
    serve.run(Caller.bind(hello.bind(), count_to_ten.bind()))
    unary = serve.get_deployment_handle("hello", "default")
    stream = serve.get_deployment_handle("count_to_ten", "default").options(stream=True)

    response = unary.remote()
    assert isinstance(response.request_id, str) and response.request_id
    assert response.by_reference is True
    assert response.result() == "hello"
    assert unary.remote().request_id != response.request_id

    gen = stream.remote()
    with pytest.raises(TypeError, match=r"doesn't support `\.result\(\)`"):
        gen.result()
    # Ray raises RuntimeError here; ladle's error is also a TypeError.
    with pytest.raises(RuntimeError, match="cannot be passed to downstream handle calls"):
        unary.remote(stream.remote())
    assert list(gen) == list(range(10))

    # Options Ray accepts: session stickiness and serialization choices.
    tuned = unary.options(session_id="s1", request_serialization="pickle",
                          response_serialization="cloudpickle")
    assert tuned.remote().result() == "hello"
    with pytest.raises(ValueError, match="request_serialization"):
        unary.options(request_serialization="yaml")
    assert (unary.deployment_name, unary.app_name) == ("hello", "default")


@serve.deployment
class Quick:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    async def __call__(self, x: int) -> int:
        return x * 2

    async def blocked(self) -> str:
        await self._signal.wait.remote()
        return "released"


def test_responses_after_the_loop_that_made_them_ended() -> None:
    handle = serve.run(Quick.bind(Signal.bind()))

    async def awaited_there() -> DeploymentResponse:
        response = handle.remote(2)
        await response
        return response

    async def left_running() -> DeploymentResponse:
        response = handle.blocked.remote()
        await async_wait_for_waiters(serve.get_deployment_handle("Signal", "default"), 1)
        return response

    # Finished while its loop ran: readable afterwards, from sync code or another loop.
    done = asyncio.run(awaited_there())
    assert done.result() == 4
    assert asyncio.run(_await(done)) == 4
    # Still running when its loop ended: a clear error (Ray keeps these going).
    running = asyncio.run(left_running())
    with pytest.raises(HandleClosedError, match="event loop this request was made in ended"):
        running.result(timeout_s=10)
    with pytest.raises(HandleClosedError, match="event loop this request was made in ended"):
        asyncio.run(_await(running))
    # The handle itself goes on working, from sync code and from a new loop.
    assert handle.remote(3).result() == 6
    assert asyncio.run(_await(handle.remote(4))) == 8
