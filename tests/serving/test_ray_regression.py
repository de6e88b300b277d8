"""Ray Serve's test_regression.py, ported by meaning: each test guards a bug Ray once had.

Skipped: test_nested_actors and test_to_object_ref_returns_after_assignment (Ray actors
and ObjectRefs), test_handle_cache_out_of_scope (Ray's private handle cache).  NumPy is
not a test dependency: test_np_in_composed_model's buffers are ``array.array`` and a
large ``bytearray`` (what pickle protocol 5 sends out of band), not ndarrays.
"""

from __future__ import annotations

import array
import gc
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from ladle import serve
from ladle.handle import DeploymentHandle, DeploymentResponse
from tests.serving.signals import Signal, wait_for_waiters


def test_fastapi_ingress_with_plain_methods_deploys(http_url: str) -> None:
    # ray-project/ray#15511: a FastAPI ingress class with non-route methods.
    app = FastAPI()

    @serve.deployment(name="custom_service")
    @serve.ingress(app)
    class CustomService:
        def deduplicate(self, data: list[Any]) -> list[Any]:
            return sorted(set(data))

        # `dict`, not `dict[str, Any]`: the class is shipped by value, without this
        # module's globals, and FastAPI must resolve the (string) annotation there.
        @app.post("/deduplicate")
        def _deduplicate(self, request: dict) -> list[Any]:  # type: ignore[type-arg]
            return self.deduplicate(request["data"])

    serve.run(CustomService.bind())
    response = httpx.post(f"{http_url}/deduplicate", json={"data": [3, 1, 3, 2]}, timeout=30)
    assert response.json() == [1, 2, 3]


@serve.deployment
class Sum:
    def __call__(self, data: Any) -> float:
        return float(sum(data))


@serve.deployment(name="model")
class ComposedModel:
    def __init__(self, handle: DeploymentHandle) -> None:
        self.model = handle

    async def __call__(self, *args: Any) -> float:
        # ray-project/ray#9441: buffers through a composed call.
        small = await self.model.remote(array.array("d", [1.0] * 100))
        large = await self.model.remote(bytearray(b"\x01" * (1 << 20)))
        return small + large


def test_buffers_in_a_composed_model(http_url: str) -> None:
    serve.run(ComposedModel.bind(Sum.bind()))
    result = httpx.get(http_url, timeout=30)
    assert result.status_code == 200
    assert float(result.text) == 100.0 + (1 << 20)


@serve.deployment
def gc_unreachable_objects(*args: Any) -> int:
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    return len(gc.garbage)


def test_no_reference_cycles_per_request(http_url: str) -> None:
    # ray-project/ray#12395: serving a request must leave no garbage cycles behind.
    handle = serve.run(gc_unreachable_objects.bind())
    known = httpx.get(http_url, timeout=30).json()
    for _ in range(10):
        assert httpx.get(http_url, timeout=30).json() == known
    known = handle.remote().result()
    for _ in range(10):
        assert handle.remote().result() == known


@serve.deployment
class Blocker:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    async def __call__(self) -> str:
        await self._signal.wait.remote()
        return "unblocked"


@serve.deployment
async def blocked_by_ref(data: Any) -> str:
    assert not isinstance(data, DeploymentResponse)
    return data


def test_an_unresolved_response_argument_holds_the_call_back() -> None:
    # ray-project/ray#12593, with a DeploymentResponse for Ray's ObjectRef.
    handle = serve.run(blocked_by_ref.bind())
    blocker = serve.run(Blocker.bind(Signal.bind()), name="blocker", route_prefix=None)
    result = handle.remote(blocker.remote())
    with pytest.raises(TimeoutError):
        result.result(timeout_s=1)
    serve.get_deployment_handle("Signal", "blocker").send.remote().result()
    assert result.result() == "unblocked"


@serve.deployment
class Collector:
    def __init__(self) -> None:
        self.lst: list[str] = []

    def append(self, msg: str) -> None:
        self.lst.append(msg)

    def get(self) -> list[str]:
        return self.lst


@serve.deployment(graceful_shutdown_timeout_s=0.0)
class FirstModel:
    def __init__(self, collector: DeploymentHandle, never: DeploymentHandle) -> None:
        self._collector = collector
        self._never = never

    async def compute(self, _id: int) -> int:
        if _id == 0:
            await self._never.wait.remote()
        await self._collector.append.remote(f"first-{_id}")
        return _id


@serve.deployment
class SecondModel:
    def __init__(self, collector: DeploymentHandle) -> None:
        self._collector = collector

    async def compute(self, _id: int) -> int:
        await self._collector.append.remote(f"second-{_id}")
        return _id


@serve.deployment
class Combine:
    def __init__(self, m1: DeploymentHandle, m2: DeploymentHandle) -> None:
        self.m1 = m1
        self.m2 = m2

    async def run(self, _id: int) -> int:
        return await self.m2.compute.remote(self.m1.compute.remote(_id))


def test_out_of_order_chaining() -> None:
    # A chain blocked upstream must not hold back a later chain through the same models.
    collector = Collector.bind()
    handle = serve.run(Combine.bind(FirstModel.bind(collector, Signal.bind()),
                                    SecondModel.bind(collector)))
    handle.run.remote(_id=0)
    assert handle.run.remote(_id=1).result(timeout_s=30) == 1
    assert serve.get_deployment_handle("Collector", "default").get.remote().result() == [
        "first-1", "second-1"]


def test_no_duplicate_content_length(http_url: str) -> None:
    # ray-project/ray#21876.
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class A:
        @app.get("/")
        def func(self) -> JSONResponse:
            return JSONResponse({"a": "b"})

    serve.run(A.bind())
    resp = httpx.get(http_url, timeout=30)
    assert resp.headers.get_list("content-length") == ["9"]


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=0.5,
                  graceful_shutdown_timeout_s=0)
class SyncBlocked:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    def check_health(self) -> bool:
        return True

    def __call__(self) -> str:
        # Blocks a worker thread for many health-check periods.
        self._signal.wait.remote().result()
        return "done"


def test_a_blocked_sync_request_does_not_fail_health_checks() -> None:
    # ray-project/ray#24554: health checks keep passing while user code blocks.
    handle = serve.run(SyncBlocked.bind(Signal.bind()))
    signal = serve.get_deployment_handle("Signal", "default")
    response = handle.remote()
    wait_for_waiters(signal, 1)
    with pytest.raises(TimeoutError):
        response.result(timeout_s=2)  # some 20 health checks
    assert serve.status().applications["default"].status == "RUNNING"
    signal.send.remote().result()
    assert response.result() == "done"
