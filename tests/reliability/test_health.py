"""Unhealthy replicas: a health check that hangs, a constructor that keeps failing."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from ladle import serve
from ladle.exceptions import DeploymentFailedError
from tests.conftest import gone, lines, replica_pids, wait_for


def deployment_status(app: str, deployment: str) -> tuple[str, str, int]:
    """(status, message, RUNNING replicas) of one deployment."""
    d = serve.status().applications[app].deployments[deployment]
    return d.status, d.message, d.replica_states.get("RUNNING", 0)


@serve.deployment(health_check_period_s=0.1, health_check_timeout_s=0.5)
class HangsOnFlag:
    """check_health hangs (in a thread, or on the loop) once a file names this replica."""

    def __init__(self, state_dir: str, hang_on_loop: bool) -> None:
        self.flag = os.path.join(state_dir, f"hang-{os.getpid()}")
        self.hang_on_loop = hang_on_loop

    async def _check_on_loop(self) -> None:
        if os.path.exists(self.flag):
            await asyncio.Event().wait()

    def _check_in_thread(self) -> None:
        if os.path.exists(self.flag):
            threading.Event().wait()

    def check_health(self):  # type: ignore[no-untyped-def]
        if self.hang_on_loop:
            return self._check_on_loop()  # an awaitable: the replica awaits it
        return self._check_in_thread()

    async def pid(self) -> int:
        return os.getpid()


@pytest.mark.parametrize("hang_on_loop", [False, True], ids=["sync", "async"])
def test_hanging_health_check_is_replaced(tmp_path: Path, hang_on_loop: bool) -> None:
    handle = serve.run(HangsOnFlag.bind(str(tmp_path), hang_on_loop), name="hangs")
    pid = handle.pid.remote().result(timeout_s=10)
    (tmp_path / f"hang-{pid}").touch()

    wait_for(lambda: gone(pid), message="the replica whose health check hangs to be stopped")
    wait_for(lambda: deployment_status("hangs", "HangsOnFlag")[::2] == ("HEALTHY", 1),
             message="a healthy replacement")
    (new_pid,) = replica_pids()
    assert new_pid != pid
    assert handle.pid.remote().result(timeout_s=10) == new_pid
    assert serve.status().applications["hangs"].status == "RUNNING"


@serve.deployment
class FailsOnFlag:
    """The constructor raises while the flag file exists; every attempt is recorded."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        with open(os.path.join(state_dir, "attempts"), "a") as f:
            f.write(f"{time.monotonic()}\n")
        if os.path.exists(os.path.join(state_dir, "flag")):
            with open(os.path.join(state_dir, "failures"), "a") as f:
                f.write(f"{os.getpid()}\n")
            raise RuntimeError("the model weights are missing")

    def __call__(self) -> int:
        return os.getpid()


@serve.deployment
class Steady:
    def __call__(self) -> str:
        return "steady"


def test_failing_constructor_is_retried_with_backoff_without_blocking_others(
        tmp_path: Path) -> None:
    flag, attempts, failures = tmp_path / "flag", tmp_path / "attempts", tmp_path / "failures"

    # On the first deploy a failing constructor fails serve.run, with the user's traceback.
    flag.touch()
    with pytest.raises(DeploymentFailedError, match="the model weights are missing") as info:
        serve.run(FailsOnFlag.bind(str(tmp_path)), name="flaky", route_prefix="/flaky")
    assert "test_health.py" in str(info.value)
    assert serve.status().applications["flaky"].status == "DEPLOY_FAILED"
    wait_for(lambda: replica_pids() == set(), message="the failed replica to be stopped")

    # Fixed, the same application deploys.
    flag.unlink()
    handle = serve.run(FailsOnFlag.bind(str(tmp_path)), name="flaky", route_prefix="/flaky")
    pid = handle.remote().result(timeout_s=10)
    other = serve.run(Steady.bind(), name="other", route_prefix="/other")

    # A healthy deployment whose replacement's constructor keeps failing.
    flag.touch()
    attempts.unlink()
    failures.unlink()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(lines(failures)) >= 1, message="a replacement to fail")
    status, message, _ = wait_for(
        lambda: (s := deployment_status("flaky", "FailsOnFlag"))[0] == "UNHEALTHY" and s,
        message="the deployment to be reported unhealthy")
    assert "Traceback" in message and "test_health.py" in message
    assert 'raise RuntimeError("the model weights are missing")' in message
    assert serve.status().applications["flaky"].status == "UNHEALTHY"

    # Other applications keep serving, and can be deployed, meanwhile.
    assert other.remote().result(timeout_s=10) == "steady"
    third = serve.run(Steady.options(name="Third").bind(), name="third", route_prefix="/third")
    assert third.remote().result(timeout_s=10) == "steady"
    assert deployment_status("flaky", "FailsOnFlag")[0] == "UNHEALTHY"

    wait_for(lambda: len(lines(failures)) >= 2, message="a second attempt to fail")
    flag.unlink()
    wait_for(lambda: deployment_status("flaky", "FailsOnFlag")[::2] == ("HEALTHY", 1),
             message="the deployment to recover once its constructor succeeds")
    assert serve.status().applications["flaky"].status == "RUNNING"
    new_pid = handle.remote().result(timeout_s=10)
    assert new_pid != pid and new_pid in replica_pids()

    # Retries back off exponentially: 0.5 s after the first failure, 1 s after the second.
    times = [float(t) for t in lines(attempts)]
    assert len(times) >= 3
    assert times[1] - times[0] >= 0.5
    assert times[2] - times[1] >= 1.0
