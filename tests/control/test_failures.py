"""Failures: a replica killed mid-request, a driver killed, a failing health check."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from ladle import serve
from ladle.exceptions import ReplicaDiedError
from tests.conftest import gone, read_line_within, replica_pids, wait_for




def running(app: str, deployment: str) -> int:
    apps = serve.status().applications
    if app not in apps:
        return 0
    return apps[app].deployments[deployment].replica_states.get("RUNNING", 0)


@serve.deployment
class Stuck:
    def __init__(self) -> None:
        self.waiting = 0
        self.never = asyncio.Event()

    async def hang(self) -> None:
        self.waiting += 1
        await self.never.wait()

    async def count(self) -> int:
        return self.waiting

    async def pid(self) -> int:
        return os.getpid()


def test_killed_replica_fails_in_flight_requests_and_is_replaced() -> None:
    handle = serve.run(Stuck.bind(), name="stuck")
    pid = handle.pid.remote().result(timeout_s=10)
    in_flight = [handle.hang.remote() for _ in range(3)]
    wait_for(lambda: handle.count.remote().result(timeout_s=10) == 3,
             message="three requests running on the replica")

    os.kill(pid, signal.SIGKILL)
    for response in in_flight:
        with pytest.raises(ReplicaDiedError):
            response.result(timeout_s=10)

    wait_for(lambda: running("stuck", "Stuck") == 1 and pid not in
             {r.pid for r in psutil.Process().children(recursive=True)},
             message="a replacement replica")
    new_pid = handle.pid.remote().result(timeout_s=10)
    assert new_pid != pid
    assert handle.count.remote().result(timeout_s=10) == 0
    assert replica_pids() == {new_pid}
    wait_for(lambda: serve.status().applications["stuck"].deployments["Stuck"].status
             == "HEALTHY", message="the deployment to be healthy again")


def test_no_replica_survives_shutdown() -> None:
    @serve.deployment(num_replicas=2)
    class Model:
        async def __call__(self) -> int:
            return os.getpid()

    serve.run(Model.bind(), name="a", route_prefix="/a")
    # A request that never finishes: shutdown drains for graceful_shutdown_timeout_s, then kills.
    stuck = Stuck.options(graceful_shutdown_timeout_s=0.5)
    stuck_handle = serve.run(stuck.bind(), name="b", route_prefix="/b")
    stuck_handle.hang.remote()
    wait_for(lambda: stuck_handle.count.remote().result(timeout_s=10) == 1,
             message="a request in flight")
    pids = replica_pids()
    assert len(pids) == 3
    serve.shutdown()
    wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10,
             message="every replica to exit after shutdown")


DRIVER_SCRIPT = """
    import json, os, sys, time
    from ladle import serve

    @serve.deployment(num_replicas=2)
    class Model:
        def pid(self):
            return os.getpid()

    handle = serve.run(Model.bind())
    pids = set()
    while len(pids) < 2:
        pids.update(handle.pid.remote().result(timeout_s=10) for _ in range(8))
    print(json.dumps(sorted(pids)), flush=True)
    time.sleep(120)  # the driver's workload: stay up until killed
"""


def test_killed_driver_leaves_no_replica(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER_SCRIPT))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    pids: list[int] = []
    try:
        line = read_line_within(driver, 30)
        pids = json.loads(line)
        assert len(pids) == 2 and driver.pid not in pids
        assert not any(gone(pid) for pid in pids)
        driver.kill()
        driver.wait(timeout=10)
        wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10,
                 message="the replicas of the killed driver to exit")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if driver.stdout is not None:
            driver.stdout.close()


def test_failing_health_check_replaces_the_replica() -> None:
    @serve.deployment(health_check_period_s=0.2, health_check_timeout_s=2)
    class Fragile:
        def __init__(self) -> None:
            self.broken = False

        def check_health(self) -> None:
            if self.broken:
                raise RuntimeError("replica is broken")

        async def breaks(self) -> None:
            self.broken = True

        async def pid(self) -> int:
            return os.getpid()

    handle = serve.run(Fragile.bind(), name="fragile")
    pid = handle.pid.remote().result(timeout_s=10)
    assert handle.pid.remote().result(timeout_s=10) == pid  # healthy: stays put
    handle.breaks.remote().result(timeout_s=10)
    wait_for(lambda: gone(pid), message="the unhealthy replica to be stopped")
    wait_for(lambda: running("fragile", "Fragile") == 1, message="a replacement replica")
    new_pid = handle.pid.remote().result(timeout_s=10)
    assert new_pid != pid
    assert replica_pids() == {new_pid}
    wait_for(lambda: serve.status().applications["fragile"].deployments["Fragile"].status
             == "HEALTHY", message="the deployment to be healthy again")
    assert serve.status().applications["fragile"].status == "RUNNING"

