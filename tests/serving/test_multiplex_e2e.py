"""``@serve.multiplexed`` with real replicas: per-replica LRU, the id in the request, affinity."""

from __future__ import annotations

import asyncio
import os

from ladle import serve
from ladle._core.snapshots import hub
from ladle._core.types import DeploymentID
from tests.conftest import wait_for


@serve.deployment(max_ongoing_requests=10)
class Models:
    """Each model is ``(model_id, pid)``; ``loads`` lists what this replica loaded."""

    def __init__(self) -> None:
        self._loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> tuple[str, int]:
        self._loads.append(model_id)
        return (model_id, os.getpid())

    async def __call__(self) -> tuple[str, str, int]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return model[0], model_id, model[1]

    def loads(self) -> list[str]:
        return list(self._loads)

    def current_model_id(self) -> str:
        return serve.get_multiplexed_model_id()

    def pid_and_loads(self) -> tuple[int, list[str]]:
        return os.getpid(), list(self._loads)


def test_lru_per_replica_and_model_id_in_request() -> None:
    handle = serve.run(Models.bind())

    def call(model_id: str) -> tuple[str, str, int]:
        return handle.options(multiplexed_model_id=model_id).remote().result()

    # The id set on the handle is the one the request sees, and what is loaded.
    assert call("a")[:2] == ("a", "a")
    assert call("b")[:2] == ("b", "b")
    assert handle.loads.remote().result() == ["a", "b"]
    assert call("a")[:2] == ("a", "a")  # cached: no load
    assert handle.loads.remote().result() == ["a", "b"]

    # A third model evicts the least recently used one ("b": "a" was just used).
    assert call("c")[:2] == ("c", "c")
    assert call("a")[:2] == ("a", "a")  # still cached
    assert handle.loads.remote().result() == ["a", "b", "c"]
    assert call("b")[:2] == ("b", "b")  # evicted earlier: loaded again, evicting "c"
    assert handle.loads.remote().result() == ["a", "b", "c", "b"]
    assert call("a")[:2] == ("a", "a")
    assert handle.loads.remote().result() == ["a", "b", "c", "b"]

    # Without the option the id is "", and options carry over to method calls.
    assert handle.current_model_id.remote().result() == ""
    assert handle.options(multiplexed_model_id="m:v1").current_model_id.remote().result() == "m:v1"
    assert handle.options(method_name="current_model_id",
                          multiplexed_model_id="x").remote().result() == "x"


def test_requests_for_a_model_go_where_it_is_loaded() -> None:
    handle = serve.run(Models.options(num_replicas=2).bind())
    replicas: dict[int, list[str]] = {}

    def loads_by_replica() -> dict[int, list[str]]:
        # Plain calls are load balanced: poll until both replicas answered.
        wait_for(lambda: replicas.update([handle.pid_and_loads.remote().result()])
                 or len(replicas) == 2, message="both replicas to answer")
        return replicas

    assert list(loads_by_replica().values()) == [[], []]  # both replicas take requests
    replicas.clear()

    m1 = handle.options(multiplexed_model_id="m1")
    _, _, home = m1.remote().result()
    assert {m1.remote().result()[2] for _ in range(20)} == {home}

    # A caller on another event loop learns where "m1" lives from the
    # controller (replicas report their loaded models), and goes there too.
    deployment_id = DeploymentID("Models", "default")

    def reported() -> bool:
        snapshot = hub.get(deployment_id)
        return snapshot is not None and any(
            "m1" in r.multiplexed_model_ids for r in snapshot.replicas)

    wait_for(reported, message="the replica to report model m1")

    async def twenty_calls() -> set[int]:
        return {(await m1.remote())[2] for _ in range(20)}

    assert asyncio.run(twenty_calls()) == {home}

    replicas.clear()
    (other,) = set(loads_by_replica()) - {home}
    assert replicas == {home: ["m1"], other: []}  # loaded once, where it went first
