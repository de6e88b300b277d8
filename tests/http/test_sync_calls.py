"""HTTP to plain deployments whose ``__call__`` is sync.

Such a request runs start to finish in a worker thread, which writes a
plain answer itself and tells the loop later (``_serving/sync_http.py``).
These tests pin what that must not change: every kind of return value,
errors, cancellation, concurrency, a request waiting for a slot, and a
drain that waits for requests in flight.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ladle import serve
from ladle._api.lifecycle import http_port
from ladle._core.context import current_request
from tests.conftest import lines, wait_for


@dataclasses.dataclass
class Point:
    x: int
    y: int


async def _echo_json(request: Request) -> Any:
    return {"echo": await request.json()}


@serve.deployment
class Shapes:
    def __call__(self, request: Request) -> Any:
        kind = request.query_params["kind"]
        if kind == "str":
            return "héllo"
        if kind == "bytes":
            return b"\x00\x01"
        if kind == "dict":
            return {"a": [1, 2.5, None, True]}
        if kind == "int":
            return 7
        if kind == "none":
            return None
        if kind == "response":
            response = JSONResponse({"made": True}, status_code=201,
                                    headers={"x-custom": "yes"})
            response.set_cookie("flavour", "oat")
            return response
        if kind == "plain-response":
            return Response("teapot", status_code=418, media_type="text/plain")
        if kind == "awaitable":
            return _echo_json(request)  # a sync method handing back a coroutine
        if kind == "datetime":
            return {"when": datetime.datetime(2026, 11, 22, 12, 0)}
        if kind == "dataclass":
            return Point(1, 2)
        if kind == "generator":
            return (i for i in range(3))
        if kind == "raise":
            raise KeyError("no such thing")
        raise AssertionError(kind)


# Up to 8 slots a worker thread answers; with more, the loop does (replica.py).
BOTH_PATHS = pytest.mark.parametrize("slots", [5, 16], ids=["thread-answers", "loop-answers"])


@BOTH_PATHS
def test_every_kind_of_answer(http_url: str, slots: int) -> None:
    serve.run(Shapes.options(max_ongoing_requests=slots).bind(), name="shapes",
              route_prefix="/s")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        def get(kind: str, **kw: Any) -> httpx.Response:
            return client.request(kw.pop("method", "GET"), "/s", params={"kind": kind}, **kw)

        r = get("str")
        assert (r.status_code, r.text, r.headers["content-type"]) == (
            200, "héllo", "text/plain; charset=utf-8")
        r = get("bytes")
        assert (r.content, r.headers["content-type"]) == (b"\x00\x01", "text/plain")
        r = get("dict")
        assert (r.json(), r.headers["content-type"]) == ({"a": [1, 2.5, None, True]},
                                                         "application/json")
        assert get("int").json() == 7
        r = get("none")
        assert (r.status_code, r.content, r.headers["content-type"]) == (200, b"", "text/plain")
        r = get("response")
        assert (r.status_code, r.json(), r.headers["x-custom"]) == (201, {"made": True}, "yes")
        assert r.cookies["flavour"] == "oat"
        r = get("plain-response")
        assert (r.status_code, r.text) == (418, "teapot")
        r = get("awaitable", method="POST", json={"n": [1, 2]})
        assert r.json() == {"echo": {"n": [1, 2]}}
        assert get("datetime").json() == {"when": "2026-11-22T12:00:00"}
        assert get("dataclass").json() == {"x": 1, "y": 2}
        for kind in ("generator", "raise"):
            r = get(kind)
            assert r.status_code == 500, kind
            assert "KeyError" not in r.text and "stream" not in r.text
        assert get("str").text == "héllo"  # and the replica is fine


@serve.deployment
class SyncBlocker:
    """Sync ``__call__``: blocks until its ``release`` file exists (``?tag=`` names the
    call; ``?wait=0`` answers at once); starts and finishes go to files, which the
    test reads while every slot of the replica may be taken."""

    def __init__(self, release: str) -> None:
        self.release = release

    def __call__(self, request: Any) -> str:
        if not isinstance(request, Request):
            return f"handle {request}"
        tag = request.query_params.get("tag", "")
        with open(self.release + ".started", "a") as f:
            f.write(tag + "\n")
        if request.query_params.get("wait") != "0":
            deadline = time.monotonic() + 30
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                time.sleep(0.005)
        with open(self.release + ".finished", "a") as f:
            f.write(tag + "\n")
        return f"done {tag}"


@BOTH_PATHS
def test_timeout_answers_408_and_frees_the_slot(tmp_path: Path, slots: int) -> None:
    release = tmp_path / "release"
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": 0.5})
    serve.run(SyncBlocker.options(max_ongoing_requests=slots).bind(str(release)),
              name="blocker", route_prefix="/b")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}", timeout=20) as client:
        # One slow call per slot: each is timed out, and its slot given back at the
        # timeout although its thread still runs.
        with concurrent.futures.ThreadPoolExecutor(slots) as pool:
            slow = list(pool.map(lambda i: client.get("/b", params={"tag": f"slow{i}"}),
                                 range(slots)))
        assert [r.status_code for r in slow] == [408] * slots
        r = client.get("/b", params={"tag": "fast", "wait": "0"})
        assert (r.status_code, r.text) == (200, "done fast")
        assert lines(Path(f"{release}.finished")) == ["fast"]
        release.touch()
        wait_for(lambda: len(lines(Path(f"{release}.finished"))) == slots + 1,
                 message="the timed-out calls to finish in their threads")
        assert client.get("/b", params={"tag": "again", "wait": "0"}).text == "done again"


def test_sync_calls_run_concurrently(http_url: str) -> None:
    @serve.deployment(max_ongoing_requests=5)
    class Meet:
        def __init__(self) -> None:
            self.barrier = threading.Barrier(5, timeout=20)

        def __call__(self, request: Request) -> int:
            return self.barrier.wait()  # only returns once all five are in at once

    serve.run(Meet.bind(), name="meet", route_prefix="/m")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{http_url}/m", timeout=30), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    assert sorted(a.json() for a in answers) == [0, 1, 2, 3, 4]


def test_a_request_waiting_for_the_slot_runs_when_a_thread_finishes(http_url: str,
                                                                    tmp_path: Path) -> None:
    # Two callers (the proxy and this process) each think the one slot is free: the
    # replica holds the second request until the first, answered by its worker
    # thread, gives the slot back.  (Whether the second one reaches the replica
    # before the release is up to timing; either way both must be answered.  The
    # drain test below is the one that needs the worker to wake the loop.)
    release = tmp_path / "release"
    handle = serve.run(SyncBlocker.options(max_ongoing_requests=1).bind(str(release)),
                       name="blocker", route_prefix="/b")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        http = pool.submit(httpx.get, f"{http_url}/b", params={"tag": "http"}, timeout=30)
        wait_for(lambda: lines(Path(f"{release}.started")) == ["http"],
                 message="the HTTP request to hold the slot")
        waiting = handle.remote("call")
        release.touch()
        assert http.result().text == "done http"
        assert waiting.result(timeout_s=15) == "handle call"


def test_drain_waits_for_a_sync_request_in_flight(http_url: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    serve.run(SyncBlocker.options(graceful_shutdown_timeout_s=60).bind(str(release)),
              name="blocker", route_prefix="/b")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        http = pool.submit(httpx.get, f"{http_url}/b", params={"tag": "inflight"}, timeout=60)
        wait_for(lambda: lines(Path(f"{release}.started")) == ["inflight"],
                 message="the request to reach the replica")
        deleting = pool.submit(serve.delete, "blocker")
        release.touch()
        assert (http.result().status_code, http.result().text) == (200, "done inflight")
        # The drain hears of the thread's answer at once, well before its 60 s.
        deleting.result(timeout=20)


@pytest.mark.parametrize("path", ["/x", "/x/deeper?q=1"])
def test_request_fields_reach_the_thread(http_url: str, path: str) -> None:
    @serve.deployment
    class Fields:
        def __call__(self, request: Request) -> dict[str, Any]:
            return {"path": request.url.path, "query": dict(request.query_params),
                    "header": request.headers.get("x-probe"), "method": request.method}

    serve.run(Fields.bind(), name="fields", route_prefix="/x")
    r = httpx.post(f"{http_url}{path}", headers={"x-probe": "p"}, timeout=10)
    expected_query = {"q": "1"} if "?" in path else {}
    assert r.json() == {"path": path.split("?")[0], "query": expected_query, "header": "p",
                        "method": "POST"}


@serve.deployment
class Big:
    def __call__(self, request: Request) -> bytes:
        n = int(request.query_params["n"])
        return bytes([n % 251]) * (3 * 1024 * 1024 + n)  # past any socket buffer


@BOTH_PATHS
def test_large_answers_at_once_arrive_whole(http_url: str, slots: int) -> None:
    # A worker's write that the socket takes only in part must go out whole before
    # any other frame: each body below is checked byte for byte.
    serve.run(Big.options(max_ongoing_requests=slots).bind(), name="big", route_prefix="/big")

    def get(n: int) -> bytes:
        return httpx.get(f"{http_url}/big", params={"n": n}, timeout=60).content

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(get, range(16)))
    for n, body in enumerate(bodies):
        assert body == bytes([n % 251]) * (3 * 1024 * 1024 + n), n


@serve.deployment
class SyncIds:
    def __init__(self, downstream: Any) -> None:
        self.downstream = downstream

    def __call__(self, request: Request) -> dict[str, str]:
        ctx = current_request()
        assert ctx is not None
        return {"here": ctx.request_id,
                "downstream": self.downstream.remote().result(timeout_s=10),
                "model": serve.get_multiplexed_model_id()}


@serve.deployment
class Echoes:
    def __call__(self) -> str:
        ctx = current_request()
        assert ctx is not None
        return ctx.request_id


@BOTH_PATHS
def test_request_context_in_the_thread(http_url: str, slots: int) -> None:
    # The request id and model id reach sync user code and the handle calls it makes
    # (blocking ones: it runs in a worker thread).
    app = SyncIds.options(max_ongoing_requests=slots).bind(Echoes.bind())
    serve.run(app, name="ids", route_prefix="/ids")
    with httpx.Client(base_url=http_url, timeout=20) as client:
        r = client.get("/ids", headers={"X-Request-Id": "req-9",
                                        "serve_multiplexed_model_id": "m-3"})
        assert r.headers["x-request-id"] == "req-9"
        assert r.json() == {"here": "req-9", "downstream": "req-9", "model": "m-3"}


@serve.deployment
class HandsBackSlowWork:
    """A sync ``__call__`` returning a coroutine that runs on the loop until cancelled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, request: Request) -> Any:
        if request.query_params.get("quick"):
            return "quick"
        return self._slow()

    async def _slow(self) -> str:
        import asyncio

        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            Path(self.marker).write_text("cancelled")
            raise
        return "slow"


@pytest.mark.parametrize("slots", [1, 16], ids=["thread-answers", "loop-answers"])
def test_timeout_cancels_the_awaitable_a_sync_call_returned(tmp_path: Path, slots: int) -> None:
    marker = tmp_path / "cancelled"
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": 0.5})
    serve.run(HandsBackSlowWork.options(max_ongoing_requests=slots).bind(str(marker)),
              name="slow", route_prefix="/slow")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}", timeout=20) as client:
        assert client.get("/slow").status_code == 408
        wait_for(marker.exists, message="the awaitable to be cancelled on the replica")
        assert client.get("/slow", params={"quick": "1"}).text == "quick"  # slot given back
