"""Status codes and errors over HTTP; cancellation on timeout and disconnect; request ids.

Replicas that block signal that they started through a method the test
polls via a handle, and record the ``asyncio.CancelledError`` they get.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import time
from pathlib import Path

import httpx
from starlette.requests import Request

from ladle import serve
from ladle._api.lifecycle import http_port
from ladle._core.context import current_request
from tests.conftest import wait_for

SECRET = "s3cr3t-detail-in-the-message"


@serve.deployment
class Fails:
    def __call__(self, request: Request) -> str:
        if request.query_params.get("fail"):
            raise ValueError(SECRET)
        return "fine"


def test_user_exception_gives_500_without_details(http_url: str) -> None:
    serve.run(Fails.bind(), name="fails", route_prefix="/fails")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        response = client.get("/fails", params={"fail": "1"})
        assert response.status_code == 500
        assert SECRET not in response.text
        assert "Traceback" not in response.text
        assert "ValueError" not in response.text
        assert len(response.text) < 100
        assert response.headers["x-request-id"]
        ok = client.get("/fails")
        assert ok.status_code == 200
        assert ok.text == "fine"


def test_debug_mode_shows_the_error() -> None:
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "debug": True})
    serve.run(Fails.bind(), name="fails", route_prefix="/fails")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}", timeout=10) as client:
        response = client.get("/fails", params={"fail": "1"})
        assert response.status_code == 500
        assert SECRET in response.text
        assert "ValueError" in response.text
        assert client.get("/fails").text == "fine"


@serve.deployment
class Blocker:
    """``__call__`` blocks until ``release`` exists; records starts and cancellations.

    Starts are also written to ``<release>.started``: readable while every
    request slot of the replica is taken.
    """

    def __init__(self, release: str) -> None:
        self.release = release
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []

    async def __call__(self, request: Request) -> str:
        tag = request.query_params.get("tag", "")
        self.started.append(tag)
        with open(self.release + ".started", "a") as f:
            f.write(tag + "\n")
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.append(tag)
            raise
        self.finished.append(tag)
        return f"done {tag}"

    def events(self) -> dict[str, list[str]]:
        return {"started": self.started, "cancelled": self.cancelled, "finished": self.finished}


def test_backpressure_gives_503(http_url: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    app = Blocker.options(max_ongoing_requests=1, max_queued_requests=1).bind(str(release))
    serve.run(app, name="blocker", route_prefix="/b")
    url = f"{http_url}/b"

    def get(tag: str) -> httpx.Response:
        return httpx.get(url, params={"tag": tag}, timeout=20)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(get, "first")
        started = Path(f"{release}.started")
        wait_for(lambda: started.exists() and started.read_text() == "first\n",
                 message="the first request to be running")
        # One of these two is queued, the other finds the queue full.
        others = [pool.submit(get, "second"), pool.submit(get, "third")]
        done, _ = concurrent.futures.wait(others, timeout=20,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        assert done, "no request was rejected while the replica was busy"
        rejected = done.pop()
        assert rejected.result().status_code == 503
        assert not release.exists() and not first.done()  # rejected at once, not after release
        release.touch()
        assert first.result().status_code == 200
        queued = others[1] if rejected is others[0] else others[0]
        assert queued.result().status_code == 200
    assert get("after").text == "done after"


def test_request_timeout_gives_408_and_cancels_the_replica(tmp_path: Path) -> None:
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": 0.5})
    handle = serve.run(Blocker.bind(str(tmp_path / "never")), name="blocker", route_prefix="/b")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}", timeout=20) as client:
        response = client.get("/b", params={"tag": "slow"})
        assert response.status_code == 408
        assert response.headers["x-request-id"]
        wait_for(lambda: handle.events.remote().result(timeout_s=10)["cancelled"] == ["slow"],
                 message="the replica to see the request cancelled")
        assert handle.events.remote().result(timeout_s=10)["finished"] == []


def test_client_disconnect_cancels_the_request(http_url: str, tmp_path: Path) -> None:
    handle = serve.run(Blocker.bind(str(tmp_path / "never")), name="blocker", route_prefix="/b")
    port = int(http_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /b?tag=gone HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        wait_for(lambda: handle.events.remote().result(timeout_s=10)["started"] == ["gone"],
                 message="the request to reach the replica")
    wait_for(lambda: handle.events.remote().result(timeout_s=10)["cancelled"] == ["gone"],
             message="the replica to see the disconnect as a cancellation")


async def test_http_client_that_gives_up_cancels_the_request(http_url: str,
                                                             tmp_path: Path) -> None:
    handle = serve.run(Blocker.bind(str(tmp_path / "never")), name="blocker", route_prefix="/b")

    async def events() -> dict[str, list[str]]:
        return await handle.events.remote()

    async with httpx.AsyncClient(base_url=http_url, timeout=20) as client:
        request = asyncio.ensure_future(client.get("/b", params={"tag": "impatient"}))
        deadline = time.monotonic() + 15
        while (await events())["started"] != ["impatient"]:
            assert time.monotonic() < deadline, "the request never reached the replica"
            await asyncio.sleep(0.02)
        request.cancel()  # httpx closes the connection
        with contextlib.suppress(asyncio.CancelledError):
            await request
    deadline = time.monotonic() + 15
    while (await events())["cancelled"] != ["impatient"]:
        assert time.monotonic() < deadline, "the replica never saw the cancellation"
        await asyncio.sleep(0.02)


@serve.deployment
class Downstream:
    def __call__(self) -> str:
        return current_request().request_id


@serve.deployment
class Upstream:
    def __init__(self, downstream) -> None:
        self.downstream = downstream

    async def __call__(self, request: Request) -> dict:
        return {"here": current_request().request_id,
                "downstream": await self.downstream.remote(),
                "model": serve.get_multiplexed_model_id()}


def test_request_ids_and_model_ids(http_url: str) -> None:
    serve.run(Upstream.bind(Downstream.bind()), name="ids", route_prefix="/ids")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        given = client.get("/ids", headers={"X-Request-Id": "my-request-42"})
        assert given.status_code == 200
        assert given.headers["x-request-id"] == "my-request-42"
        assert given.json() == {"here": "my-request-42", "downstream": "my-request-42",
                                "model": ""}

        generated = client.get("/ids")
        request_id = generated.headers["x-request-id"]
        assert request_id
        assert generated.json()["here"] == request_id
        assert generated.json()["downstream"] == request_id
        assert client.get("/ids").headers["x-request-id"] != request_id

        model = client.get("/ids", headers={"serve_multiplexed_model_id": "model-7"})
        assert model.json()["model"] == "model-7"
