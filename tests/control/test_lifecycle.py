"""Applications over their life: run, update in place, delete, shutdown, status, lookups."""

from __future__ import annotations

import os
from typing import Any

import pytest

from ladle import serve
from ladle.exceptions import DeploymentFailedError, RayServeException
from tests.conftest import gone, replica_pids, wait_for




def running(app: str, deployment: str) -> int:
    overview = serve.status().applications[app].deployments[deployment]
    return overview.replica_states.get("RUNNING", 0)


def collect(handle: Any, n: int, batch: int = 16) -> dict[int, Any]:
    """Call ``handle`` (a method returning ``(pid, ...)``) until ``n`` replicas answered."""
    seen: dict[int, Any] = {}

    def enough() -> bool:
        for response in [handle.remote() for _ in range(batch)]:
            value = response.result(timeout_s=10)
            seen[value[0]] = value
        return len(seen) >= n

    wait_for(enough, timeout_s=10, message=f"answers from {n} replicas")
    assert len(seen) == n, seen
    return seen


# Module level: pickled by reference, imported by the replica from this test module.
@serve.deployment(num_replicas=2, user_config={"threshold": 1})
class Configured:
    def __init__(self) -> None:
        self.events: list[Any] = ["init"]
        self.threshold: Any = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.events.append(("reconfigure", user_config))
        self.threshold = user_config["threshold"]

    def info(self) -> tuple[int, Any, list[Any]]:
        return os.getpid(), self.threshold, self.events


def test_run_returns_once_every_replica_is_ready() -> None:
    @serve.deployment(num_replicas=3)
    class Model:
        def __init__(self, scale: int) -> None:
            self.scale = scale

        def __call__(self, x: int) -> int:
            return x * self.scale

        async def pid(self) -> tuple[int]:
            return (os.getpid(),)

    handle = serve.run(Model.bind(3), name="app")
    # No waiting: serve.run only returns once all three replicas are up.
    status = serve.status()
    app = status.applications["app"]
    assert app.status == "RUNNING"
    assert app.route_prefix == "/"
    deployment = app.deployments["Model"]
    assert deployment.status == "HEALTHY"
    assert deployment.replica_states == {"RUNNING": 3}
    assert deployment.target_num_replicas == 3
    assert len(replica_pids()) == 3
    assert handle.remote(2).result(timeout_s=10) == 6
    assert set(collect(handle.pid, 3)) == replica_pids()


def test_run_again_with_new_code_replaces_replicas() -> None:
    @serve.deployment(name="Model", num_replicas=2)
    class First:
        def __call__(self) -> tuple[int, str]:
            return os.getpid(), "first"

    @serve.deployment(name="Model", num_replicas=2)
    class Second:
        def __call__(self) -> tuple[int, str]:
            return os.getpid(), "second"

    handle = serve.run(First.bind(), name="app")
    old = collect(handle, 2)
    assert {answer for _, answer in old.values()} == {"first"}

    handle = serve.run(Second.bind(), name="app")
    new = collect(handle, 2)
    assert {answer for _, answer in new.values()} == {"second"}
    assert not set(old) & set(new)
    wait_for(lambda: all(gone(pid) for pid in old), timeout_s=10,
             message="the old replicas to stop")
    assert running("app", "Model") == 2
    assert list(serve.status().applications) == ["app"]


def test_user_config_change_reconfigures_in_place() -> None:
    handle = serve.run(Configured.bind(), name="app").info
    before = collect(handle, 2)
    for _, threshold, events in before.values():
        # reconfigure runs after __init__, with the user_config of the deployment.
        assert threshold == 1
        assert events == ["init", ("reconfigure", {"threshold": 1})]
    processes = replica_pids()
    assert processes == set(before)

    handle = serve.run(Configured.options(user_config={"threshold": 2}).bind(), name="app").info
    after = collect(handle, 2)
    assert set(after) == set(before)  # same replicas, not restarted
    for _, threshold, events in after.values():
        assert threshold == 2
        assert events == ["init", ("reconfigure", {"threshold": 1}),
                          ("reconfigure", {"threshold": 2})]
    assert replica_pids() == processes
    assert Configured.user_config == {"threshold": 1}


def test_delete_removes_the_app_and_stops_its_replicas() -> None:
    @serve.deployment(num_replicas=2)
    class Doomed:
        def __call__(self) -> tuple[int]:
            return (os.getpid(),)

    @serve.deployment
    class Kept:
        def __call__(self) -> tuple[int]:
            return (os.getpid(),)

    doomed = serve.run(Doomed.bind(), name="doomed", route_prefix="/doomed")
    kept = serve.run(Kept.bind(), name="kept", route_prefix="/kept")
    doomed_pids = set(collect(doomed, 2))
    kept_pid = kept.remote().result(timeout_s=10)[0]

    serve.delete("doomed")
    assert list(serve.status().applications) == ["kept"]
    wait_for(lambda: all(gone(pid) for pid in doomed_pids), timeout_s=10,
             message="the deleted app's replicas to stop")
    assert replica_pids() == {kept_pid}
    with pytest.raises(RayServeException, match="doomed"):
        serve.get_app_handle("doomed")
    assert kept.remote().result(timeout_s=10) == (kept_pid,)
    serve.delete("doomed")  # deleting twice is harmless


def test_shutdown_stops_everything() -> None:
    @serve.deployment(num_replicas=2)
    class A:
        def __call__(self) -> tuple[int]:
            return (os.getpid(),)

    serve.run(A.bind(), name="a", route_prefix="/a")
    serve.run(A.options(num_replicas=1).bind(), name="b", route_prefix="/b")
    pids = replica_pids()
    assert len(pids) == 3
    serve.shutdown()
    wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10,
             message="every replica to stop")
    assert serve.status().applications == {}
    serve.shutdown()  # twice is harmless


def test_constructor_error_fails_the_run_and_leaves_no_process() -> None:
    def explode_in_constructor() -> None:
        raise RuntimeError("constructor exploded 42")

    @serve.deployment(num_replicas=2)
    class Broken:
        def __init__(self) -> None:
            explode_in_constructor()

        def __call__(self) -> str:
            return "never"

    with pytest.raises(DeploymentFailedError) as info:
        serve.run(Broken.bind(), name="broken")
    text = str(info.value)
    assert "explode_in_constructor" in text
    assert "constructor exploded 42" in text
    app = serve.status().applications["broken"]
    assert app.status == "DEPLOY_FAILED"
    assert app.deployments["Broken"].status == "DEPLOY_FAILED"
    wait_for(lambda: not replica_pids(), timeout_s=10,
             message="the failed replicas to stop")


def test_app_and_deployment_handles() -> None:
    @serve.deployment
    class Downstream:
        def __call__(self, x: int) -> int:
            return x + 1

    @serve.deployment
    class Ingress:
        def __init__(self, downstream: Any) -> None:
            self.downstream = downstream

        async def __call__(self, x: int) -> int:
            return await self.downstream.remote(x) * 10

        async def lookup(self, x: int) -> int:
            # From inside a replica; the app name defaults to the caller's own.
            handle = serve.get_deployment_handle("Downstream")
            return await handle.remote(x)

    serve.run(Ingress.bind(Downstream.bind()), name="app", route_prefix=None)
    assert serve.get_app_handle("app").remote(1).result(timeout_s=10) == 20
    downstream = serve.get_deployment_handle("Downstream", "app")
    assert downstream.remote(1).result(timeout_s=10) == 2
    assert serve.get_deployment_handle("Ingress", app_name="app").lookup.remote(4).result(
        timeout_s=10) == 5

    with pytest.raises(RayServeException, match="'missing_app'"):
        serve.get_app_handle("missing_app")
    with pytest.raises(RayServeException, match="'NoSuchDeployment'"):
        serve.get_deployment_handle("NoSuchDeployment", "app")
    with pytest.raises(RayServeException, match="'missing_app'"):
        serve.get_deployment_handle("Downstream", "missing_app")


def test_replica_context_is_distinct_per_replica() -> None:
    @serve.deployment(num_replicas=3)
    class Model:
        def __call__(self) -> tuple[int, str, str, str, Any]:
            ctx = serve.get_replica_context()
            return os.getpid(), ctx.app_name, ctx.deployment, ctx.replica_tag, ctx.replica_id

    handle = serve.run(Model.bind(), name="ctx_app")
    answers = collect(handle, 3)
    assert {(app, dep) for _, app, dep, _, _ in answers.values()} == {("ctx_app", "Model")}
    tags = {tag for _, _, _, tag, _ in answers.values()}
    ids = {str(rid) for _, _, _, _, rid in answers.values()}
    assert len(tags) == 3
    assert len(ids) == 3
    # The same replica always reports the same context.
    again = collect(handle, 3)
    assert again == answers

    with pytest.raises(RayServeException, match="get_replica_context"):
        serve.get_replica_context()


def test_two_apps_with_different_route_prefixes() -> None:
    @serve.deployment
    class Echo:
        def __init__(self, label: str) -> None:
            self.label = label

        def __call__(self) -> str:
            return self.label

    one = serve.run(Echo.bind("one"), name="one", route_prefix="/one")
    two = serve.run(Echo.bind("two"), name="two", route_prefix="/two")
    assert one.remote().result(timeout_s=10) == "one"
    assert two.remote().result(timeout_s=10) == "two"
    apps = serve.status().applications
    assert apps["one"].route_prefix == "/one"
    assert apps["two"].route_prefix == "/two"
    assert all(app.status == "RUNNING" for app in apps.values())

    with pytest.raises(RayServeException) as info:
        serve.run(Echo.bind("three"), name="three", route_prefix="/one")
    message = str(info.value)
    assert "/one" in message and "'one'" in message and "'three'" in message
    assert set(serve.status().applications) == {"one", "two"}
    assert one.remote().result(timeout_s=10) == "one"
    # Re-running the same app at its own prefix is an update, not a conflict.
    serve.run(Echo.bind("uno"), name="one", route_prefix="/one")
    assert one.remote().result(timeout_s=10) == "uno"


@pytest.mark.parametrize(("route_prefix", "error"), [
    ("api", ValueError),
    ("/api/", ValueError),
    ("/api/{id}", ValueError),
    ("", ValueError),
    (5, TypeError),
])
def test_route_prefix_validation(route_prefix: Any, error: type[Exception]) -> None:
    @serve.deployment
    def hello() -> str:
        return "hello"

    with pytest.raises(error, match="route_prefix"):
        serve.run(hello.bind(), name="app", route_prefix=route_prefix)
    with pytest.raises(error, match="route_prefix"):
        serve.deployment(route_prefix=route_prefix)(hello.func_or_class)
    assert serve.status().applications == {}
    assert not replica_pids()
