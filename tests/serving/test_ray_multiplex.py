"""Ray Serve's test_multiplex.py, ported by meaning (the per-replica LRU and handle affinity
are in test_multiplex_e2e.py; the decorator in tests/unit/test_multiplex.py).

Skipped: the assertions on ``_ModelMultiplexWrapper`` and the router's private replica
table; their user-visible effects (what loads, where requests go) are checked here.
"""

from __future__ import annotations

import os

import httpx

from ladle import serve
from ladle._core.snapshots import hub
from ladle._core.types import DeploymentID
from ladle.handle import DeploymentHandle
from tests.conftest import wait_for
from tests.serving.signals import Signal, wait_for_waiters


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class Model:
    def __init__(self, signal: DeploymentHandle) -> None:
        self._signal = signal

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, tag: str) -> str:
        return tag

    async def __call__(self, request: object = None) -> int:
        await self.get_model(serve.get_multiplexed_model_id())
        return os.getpid()

    async def blocked(self) -> int:
        await self.get_model(serve.get_multiplexed_model_id())
        await self._signal.wait.remote()
        return os.getpid()


def _reported(deployment: str, model_id: str) -> bool:
    snapshot = hub.get(DeploymentID(deployment, "default"))
    return snapshot is not None and any(model_id in r.multiplexed_model_ids
                                        for r in snapshot.replicas)


def test_requests_for_a_model_stick_to_its_replica(http_url: str) -> None:
    handle = serve.run(Model.bind(Signal.bind()))
    headers = {"serve_multiplexed_model_id": "1"}
    initial_pid = httpx.get(http_url, headers=headers, timeout=30).json()
    wait_for(lambda: _reported("Model", "1"), message="the replica to report model 1")

    # HTTP (the header) and handles (the option) both go where the model is.
    for _ in range(10):
        assert httpx.get(http_url, headers=headers, timeout=30).json() == initial_pid
    for _ in range(10):
        assert handle.options(multiplexed_model_id="1").remote("x").result() == initial_pid

    # When that replica is busy, the model's requests are not held back for it.
    signal = serve.get_deployment_handle("Signal", "default")
    blocked = handle.options(multiplexed_model_id="1").blocked
    first, second = blocked.remote(), blocked.remote()
    wait_for_waiters(signal, 2)
    signal.send.remote().result()
    assert first.result() != second.result()
    wait_for(lambda: _reported("Model", "1"), message="model 1 to be reported")


@serve.deployment
class Downstream:
    def __call__(self) -> str:
        return serve.get_multiplexed_model_id()


@serve.deployment
class Upstream:
    def __init__(self, downstream: DeploymentHandle) -> None:
        self._h = downstream

    async def __call__(self) -> tuple[str, str, str]:
        before = serve.get_multiplexed_model_id()
        other = await self._h.options(multiplexed_model_id="bar").remote()
        return before, other, serve.get_multiplexed_model_id()


def test_model_id_on_a_handle_is_not_set_in_the_caller() -> None:
    handle = serve.run(Upstream.bind(Downstream.bind()))
    assert handle.options(multiplexed_model_id="foo").remote().result() == ("foo", "bar", "foo")


@serve.deployment
class Recorder:
    def __init__(self) -> None:
        self.records: set[str] = set()

    def add(self, model_id: str) -> None:
        self.records.add(model_id)

    def get(self) -> set[str]:
        return self.records


class RecordedModel:
    def __init__(self, model_id: str, recorder: DeploymentHandle) -> None:
        self.model_id = model_id
        self.recorder = recorder

    def __del__(self) -> None:
        self.recorder.add.remote(self.model_id)  # not awaited, as in Ray's test


@serve.deployment
class Upgraded:
    def __init__(self, recorder: DeploymentHandle) -> None:
        self._recorder = recorder

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, tag: str) -> RecordedModel:
        return RecordedModel(tag, self._recorder)

    async def __call__(self, request: object) -> int:
        await self.get_model(serve.get_multiplexed_model_id())
        return os.getpid()


def test_replacing_a_replica_unloads_its_models(http_url: str) -> None:
    recorder = serve.run(Recorder.bind(), name="recorder", route_prefix="/recorder")
    serve.run(Upgraded.bind(recorder))
    httpx.get(http_url, headers={"serve_multiplexed_model_id": "1"}, timeout=30)
    assert recorder.get.remote().result() == set()
    # A new version replaces the replica: the old one unloads model "1" as it stops.
    serve.run(Upgraded.options(version="2").bind(recorder))
    wait_for(lambda: recorder.get.remote().result() == {"1"}, message="model 1 unloaded")
