"""A replica SIGKILLed under steady load (handles and HTTP): exactly its in-flight requests fail.

To know exactly what is in flight on the victim when it dies, the victim is
frozen first: once a flag file names its pid, every request it starts
records its tag and never finishes.  Each router (the driver's, the
proxy's) sends a replica at most ``max_ongoing_requests``, so the victim
fills up, routers send everything else to the other replica, and the
victim's own count of requests (running plus waiting for a slot) is the
exact number in flight on it.  Then it is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ladle import serve
from ladle._api import lifecycle
from ladle._backends.local.sockets import open_connection
from tests.conftest import gone, lines, replica_pids, wait_for
from tests.reliability.load import Load, handle_caller, http_caller

MAX_ONGOING = 2
ROUTERS = 2  # this process's router (handle calls from threads) and the proxy's


@serve.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING)
class Worker:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    async def work(self, tag: str) -> dict[str, int]:
        pid = os.getpid()
        if os.path.exists(os.path.join(self.state_dir, f"freeze-{pid}")):
            with open(os.path.join(self.state_dir, f"frozen-{pid}"), "a") as f:
                f.write(tag + "\n")
            await asyncio.Event().wait()
        await asyncio.sleep(0.005)  # the work
        return {"pid": pid}

    async def __call__(self, request: Request) -> dict[str, int]:
        return await self.work(request.query_params["tag"])


def replica_ongoing(replica_id: str) -> int:
    """What the replica counts as in flight on it: running, plus waiting for a slot."""
    assert lifecycle._instance is not None
    run_dir = lifecycle._instance.controller.backend.run_dir

    async def ask() -> int:
        conn = await open_connection(f"unix:{run_dir}/{replica_id}.sock")
        try:
            stats: Any = await asyncio.wait_for(conn.call("__ladle_stats__"), 5)
            return int(stats.ongoing_requests)
        finally:
            await conn.aclose()
            await asyncio.sleep(0)

    return asyncio.run(ask())


def running(app: str, deployment: str) -> int:
    apps = serve.status().applications
    return apps[app].deployments[deployment].replica_states.get("RUNNING", 0) if app in apps else 0


def test_sigkill_under_load_fails_exactly_the_requests_in_flight(http_url: str,
                                                                 tmp_path: Path) -> None:
    handle = serve.run(Worker.bind(str(tmp_path)), name="worker", route_prefix="/work")
    pids = replica_pids()
    assert len(pids) == 2
    victim = min(pids)
    survivor = max(pids)
    replica_id = {pid: name for name, pid in lifecycle.instance_pids().items()}[victim]

    def served(path: str, since: float) -> set[int]:
        return {o.value["pid"] for o in load.successes_since(since, path)}

    with Load({"handle": handle_caller(handle.work),
               "http": http_caller(f"{http_url}/work")}, threads=8) as load:
        started = time.monotonic()
        wait_for(lambda: served("handle", started) == pids and served("http", started) == pids,
                 message="both replicas to serve handle and HTTP requests")

        (tmp_path / f"freeze-{victim}").touch()
        in_flight = MAX_ONGOING * ROUTERS
        wait_for(lambda: len(lines(tmp_path / f"frozen-{victim}")) == MAX_ONGOING
                 and replica_ongoing(replica_id) == in_flight,
                 message=f"{in_flight} requests in flight on the frozen replica")
        frozen = lines(tmp_path / f"frozen-{victim}")
        # The load goes on, on the other replica alone.
        before_kill = time.monotonic()
        wait_for(lambda: served("handle", before_kill) == {survivor}
                 and served("http", before_kill) == {survivor},
                 message="the other replica to keep serving")

        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: gone(victim) and running("worker", "Worker") == 2
                 and len(replica_pids()) == 2, message="a replacement replica")
        (replacement,) = replica_pids() - {survivor}
        assert replacement != victim
        replaced_at = time.monotonic()
        wait_for(lambda: replacement in served("handle", replaced_at)
                 and replacement in served("http", replaced_at),
                 message="the replacement to serve handle and HTTP requests")

    outcomes = load.outcomes
    errors = [o for o in outcomes if not o.ok]
    # Exactly the requests in flight on the victim failed, each with ReplicaDiedError
    # (500 over HTTP, as in Ray Serve); none hung, none of the queued or later ones failed.
    assert sorted(o.error for o in errors) == (
        ["ReplicaDiedError"] * MAX_ONGOING + ["http 500"] * MAX_ONGOING), errors
    assert set(frozen) <= {o.tag for o in errors}
    for error in errors:
        assert error.sent < killed_at
        assert killed_at <= error.done <= killed_at + 2.0, error
    assert len(outcomes) > 100  # it was a load, not a handful of calls
    assert served("handle", killed_at) | served("http", killed_at) <= {survivor, replacement}
    wait_for(lambda: serve.status().applications["worker"].deployments["Worker"].status
             == "HEALTHY", message="the deployment to be healthy again")
