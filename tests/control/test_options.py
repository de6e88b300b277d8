"""Deployment options: validated at decoration time, copied by ``.options()``, honoured by run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil
import pytest

from ladle import serve
from ladle.serve.config import AutoscalingConfig
from tests.conftest import wait_for

# (option, bad value, error type): every option API.md lists, with a wrong type and a bad value.
BAD_OPTIONS = [
    ("name", "", ValueError),
    ("name", "a/b", ValueError),
    ("name", 3, TypeError),
    ("num_replicas", 0, ValueError),
    ("num_replicas", -1, ValueError),
    ("num_replicas", "two", ValueError),
    ("num_replicas", 1.5, TypeError),
    ("num_replicas", True, TypeError),
    ("max_ongoing_requests", 0, ValueError),
    ("max_ongoing_requests", "5", TypeError),
    ("max_ongoing_requests", 2.5, TypeError),
    ("max_queued_requests", 0, ValueError),
    ("max_queued_requests", -2, ValueError),
    ("max_queued_requests", "x", TypeError),
    ("user_config", object(), ValueError),
    ("user_config", {"a": {1, 2}}, ValueError),
    ("autoscaling_config", {"min_replicas": 3, "max_replicas": 1}, ValueError),
    ("autoscaling_config", {"min_replicas": -1}, ValueError),
    ("autoscaling_config", {"target_ongoing_requests": 0}, ValueError),
    ("autoscaling_config", {"bogus": 1}, ValueError),
    ("autoscaling_config", "x", TypeError),
    ("health_check_period_s", 0, ValueError),
    ("health_check_period_s", -1, ValueError),
    ("health_check_period_s", "1", TypeError),
    ("health_check_timeout_s", 0, ValueError),
    ("health_check_timeout_s", "1", TypeError),
    ("graceful_shutdown_timeout_s", -1, ValueError),
    ("graceful_shutdown_timeout_s", "1", TypeError),
    ("ray_actor_options", {"num_cpus": -1}, ValueError),
    ("ray_actor_options", {"num_cpus": "1"}, TypeError),
    ("ray_actor_options", {"bogus": 1}, ValueError),
    ("ray_actor_options", "x", TypeError),
    ("version", 3, TypeError),
    ("route_prefix", "api", ValueError),
    ("route_prefix", "/api/", ValueError),
    ("route_prefix", 3, TypeError),
    ("bogus_option", 1, TypeError),
    ("max_concurrent_queries", 3, TypeError),
]


class Plain:
    def __call__(self) -> int:
        return os.getpid()


@pytest.mark.parametrize(("option", "value", "error"), BAD_OPTIONS,
                         ids=[f"{o}={v!r}" for o, v, _ in BAD_OPTIONS])
def test_bad_option_raises_at_decoration_time(option: str, value: Any,
                                               error: type[Exception]) -> None:
    with pytest.raises(error) as decorated:
        serve.deployment(**{option: value})
    assert type(decorated.value) is error
    assert option in str(decorated.value)

    dep = serve.deployment(Plain)
    with pytest.raises(error) as optioned:
        dep.options(**{option: value})
    assert type(optioned.value) is error
    assert option in str(optioned.value)
    assert dep.name == "Plain" and dep.num_replicas is None


def test_num_replicas_and_autoscaling_config_conflict() -> None:
    with pytest.raises(ValueError, match="num_replicas"):
        serve.deployment(num_replicas=2, autoscaling_config={"min_replicas": 1, "max_replicas": 2})


def test_options_returns_a_modified_copy() -> None:
    original = serve.deployment(name="Original", num_replicas=2, user_config={"a": 1},
                                max_ongoing_requests=7)(Plain)
    copy = original.options(name="Copy", num_replicas=3, user_config={"a": 2},
                            max_queued_requests=4)
    assert copy is not original
    assert (copy.name, copy.num_replicas, copy.user_config, copy.max_queued_requests,
            copy.max_ongoing_requests) == ("Copy", 3, {"a": 2}, 4, 7)
    assert (original.name, original.num_replicas, original.user_config,
            original.max_queued_requests, original.max_ongoing_requests) == (
        "Original", 2, {"a": 1}, -1, 7)
    assert copy.func_or_class is original.func_or_class is Plain
    assert original.options().name == "Original"


def test_auto_and_autoscaling_deploy_with_min_replicas() -> None:
    auto = serve.deployment(num_replicas="auto")(Plain)
    scaled = serve.deployment(name="Scaled", autoscaling_config=AutoscalingConfig(
        min_replicas=2, max_replicas=4))(Plain)
    from_dict = serve.deployment(name="FromDict", autoscaling_config={
        "min_replicas": 1, "initial_replicas": 2, "max_replicas": 3})(Plain)
    auto_handle = serve.run(auto.bind(), name="auto", route_prefix=None)
    serve.run(scaled.bind(), name="scaled", route_prefix=None)
    serve.run(from_dict.bind(), name="from_dict", route_prefix=None)
    apps = serve.status().applications
    assert apps["auto"].deployments["Plain"].replica_states == {"RUNNING": 1}
    assert apps["scaled"].deployments["Scaled"].replica_states == {"RUNNING": 2}
    assert apps["from_dict"].deployments["FromDict"].replica_states == {"RUNNING": 2}
    assert all(app.status == "RUNNING" for app in apps.values())
    assert auto_handle.remote().result(timeout_s=10) != os.getpid()


@serve.deployment
class ModuleLevel:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    def __call__(self, name: str) -> str:
        return f"{self.greeting} {name} from {type(self).__module__}"


@serve.deployment
def module_function(name: str) -> str:
    return f"hi {name}"


def test_classes_and_functions_from_a_test_and_from_a_module() -> None:
    @serve.deployment
    class Nested:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, name: str) -> str:
            return "nested+" + await self.inner.remote(name)

    @serve.deployment
    async def async_function(name: str) -> str:
        return f"async {name}"

    module = serve.run(ModuleLevel.bind("hello"), name="module", route_prefix="/module")
    assert module.remote("ann").result(timeout_s=10) == f"hello ann from {__name__}"
    nested = serve.run(Nested.bind(ModuleLevel.bind("hey")), name="nested", route_prefix="/n")
    assert nested.remote("bo").result(timeout_s=10) == f"nested+hey bo from {__name__}"
    function = serve.run(module_function.bind(), name="function", route_prefix="/f")
    assert function.remote("cy").result(timeout_s=10) == "hi cy"
    afunction = serve.run(async_function.bind(), name="afunction", route_prefix="/af")
    assert afunction.remote("di").result(timeout_s=10) == "async di"


MAIN_SCRIPT = """
    import json, os
    from ladle import serve

    @serve.deployment(num_replicas=2)
    class MainModel:
        def __init__(self, offset):
            self.offset = offset

        def __call__(self, x):
            return x + self.offset

        def where(self):
            return os.getpid(), type(self).__module__

    handle = serve.run(MainModel.bind(10), name="main_app")
    pids = set()
    for _ in range(50):
        pid, module = handle.where.remote().result(timeout_s=10)
        pids.add(pid)
    print(json.dumps({"result": handle.remote(5).result(timeout_s=10), "module": module,
                      "driver": os.getpid(), "pids": sorted(pids)}))
    serve.shutdown()
"""


def test_class_defined_in_main(tmp_path: Path) -> None:
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(MAIN_SCRIPT))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=40, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["result"] == 15
    assert report["module"] == "__main__"
    assert report["driver"] not in report["pids"]

    def gone(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(gone(pid) for pid in report["pids"]), timeout_s=10,
             message="the script's replicas to exit")
