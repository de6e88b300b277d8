"""Rolling updates under load: new code, new options, a new user_config — zero failed requests.

Caller threads send requests through a handle and over HTTP the whole
time.  Requests held on the old replicas when the update starts must
finish there (the old replicas drain); a sampler checks that the
deployment never has fewer RUNNING replicas than it asks for.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ladle import serve
from tests.conftest import gone, lines, replica_pids, wait_for
from tests.reliability.load import CALL_TIMEOUT_S, Load, handle_caller, http_caller

OPTIONS: dict[str, Any] = dict(name="Model", num_replicas=2, max_ongoing_requests=8,
                               graceful_shutdown_wait_loop_s=0.2)


async def answer(state_dir: str, arg: Any, version: str) -> dict[str, Any]:
    """``arg`` is a tag (handle calls) or a starlette Request (HTTP)."""
    tag = arg if isinstance(arg, str) else arg.query_params["tag"]
    if tag.startswith("hold"):
        with open(os.path.join(state_dir, "held"), "a") as f:
            f.write(f"{tag} {os.getpid()}\n")
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(state_dir, "release")):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            await asyncio.sleep(0.01)
    else:
        await asyncio.sleep(0.005)  # the work
    return {"version": version, "pid": os.getpid()}


@serve.deployment(**OPTIONS)
class ModelV1:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    async def __call__(self, arg: Any) -> dict[str, Any]:
        return await answer(self.state_dir, arg, "v1")


@serve.deployment(**OPTIONS)
class ModelV2:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.label = ""

    def reconfigure(self, config: dict[str, str]) -> None:
        self.label = config["label"]

    async def __call__(self, arg: Any) -> dict[str, Any]:
        return await answer(self.state_dir, arg, f"v2{self.label}")


@contextmanager
def running_replicas_sampled() -> Iterator[list[int]]:
    """Sample the deployment's RUNNING replica count until the block ends."""
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            d = serve.status().applications["app"].deployments["Model"]
            samples.append(d.replica_states.get("RUNNING", 0))
            done.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join(10)


def test_rolling_updates_under_load_fail_no_request(http_url: str, tmp_path: Path) -> None:
    state = str(tmp_path)
    handle = serve.run(ModelV1.bind(state), name="app", route_prefix="/m")
    v1_pids = replica_pids()
    assert len(v1_pids) == 2

    def versions(since: float, path: str) -> set[str]:
        return {o.value["version"] for o in load.successes_since(since, path)}

    def serving(version: str) -> None:
        since = time.monotonic()
        wait_for(lambda: versions(since, "handle") == {version}
                 and versions(since, "http") == {version},
                 message=f"only {version} to answer handle and HTTP requests")

    pool = concurrent.futures.ThreadPoolExecutor(2)
    with Load({"handle": handle_caller(handle), "http": http_caller(f"{http_url}/m")},
              threads=4) as load:
        serving("v1")

        # New code, with requests held on the old replicas: they drain, not die.
        held_handle = handle.remote("hold-handle")
        held_http = pool.submit(httpx.get, f"{http_url}/m", params={"tag": "hold-http"},
                                timeout=CALL_TIMEOUT_S)
        wait_for(lambda: len(lines(tmp_path / "held")) == 2, message="two held requests")
        with running_replicas_sampled() as samples:
            serve.run(ModelV2.options(user_config={"label": "a"}).bind(state),
                      name="app", route_prefix="/m")
            v2_pids = replica_pids() - v1_pids
            assert len(v2_pids) == 2
            serving("v2a")
            holding = {int(line.split()[1]) for line in lines(tmp_path / "held")}
            assert holding <= v1_pids
            assert not any(gone(pid) for pid in holding)  # draining the held requests
            (tmp_path / "release").touch()
            assert held_handle.result(timeout_s=CALL_TIMEOUT_S)["version"] == "v1"
            response = held_http.result(CALL_TIMEOUT_S)
            assert (response.status_code, response.json()["version"]) == (200, "v1")
            wait_for(lambda: all(gone(pid) for pid in v1_pids), message="v1 replicas to stop")
        assert samples and min(samples) >= 2, samples

        # New options that need new replicas.
        with running_replicas_sampled() as samples:
            serve.run(ModelV2.options(user_config={"label": "a"}, max_ongoing_requests=6)
                      .bind(state), name="app", route_prefix="/m")
            wait_for(lambda: all(gone(pid) for pid in v2_pids) and len(replica_pids()) == 2,
                     message="the replicas with the old options to stop")
        assert samples and min(samples) >= 2, samples
        new_pids = replica_pids()
        assert not new_pids & (v1_pids | v2_pids)
        serving("v2a")

        # A user_config change alone reconfigures the running replicas in place.
        serve.run(ModelV2.options(user_config={"label": "b"}, max_ongoing_requests=6)
                  .bind(state), name="app", route_prefix="/m")
        serving("v2b")
        assert replica_pids() == new_pids

    pool.shutdown()
    outcomes = load.outcomes
    assert [o for o in outcomes if not o.ok] == []
    assert len(outcomes) > 100
    assert serve.status().applications["app"].deployments["Model"].status == "HEALTHY"
