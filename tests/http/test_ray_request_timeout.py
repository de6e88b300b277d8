"""Ray Serve's test_request_timeout.py, ported by meaning: ``request_timeout_s`` answers
408 to requests that run, wait for a replica or stream for too long, and cancels them
(and the calls they made) in the replicas.

Ray sets the timeout with an environment variable or through its REST API; here it
is ``http_options``.  Replicas signal through files (tests/http/signals.py) where
Ray's tests use a ``SignalActor``; timeouts that must not fire are generous.
Not ported: Ray's task-listing API (here each cancelled request is seen instead).
No ``from __future__ import annotations``: see test_ray_http_routes.py.
"""

import asyncio
import concurrent.futures

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ladle import serve
from ladle._api.lifecycle import http_port
from tests.conftest import lines, wait_for
from tests.http.signals import note, released


def start(timeout_s: float) -> str:
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": timeout_s})
    return f"http://127.0.0.1:{http_port()}"


def test_a_timeout_does_not_disturb_normal_requests() -> None:
    url = start(30)

    @serve.deployment(num_replicas=2)
    def f(*args):
        return "Success!"

    serve.run(f.bind())
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: httpx.get(url, timeout=60).text, range(10)))
    assert answers == ["Success!"] * 10


def test_a_request_that_runs_too_long_gets_408(tmp_path) -> None:
    url = start(2)
    release = str(tmp_path / "release")

    @serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=0)
    class HangsOnFirstRequest:
        def __init__(self):
            self._saw_first_request = False

        async def __call__(self):
            if not self._saw_first_request:
                self._saw_first_request = True
                await released(release)
            return "Success!"

    serve.run(HangsOnFirstRequest.bind())
    response = httpx.get(url, timeout=30)
    assert response.status_code == 408
    assert response.text == (f"Request {response.headers['x-request-id']} timed out "
                             "after 2.0s.")
    open(release, "w").close()
    wait_for(lambda: httpx.get(url, timeout=30).text == "Success!",
             message="a request that is not the first of its replica")


def test_requests_waiting_for_a_replica_time_out_too(tmp_path) -> None:
    url = start(2)
    release = str(tmp_path / "release")

    @serve.deployment(graceful_shutdown_timeout_s=0, max_ongoing_requests=1)
    class Hangs:
        async def __call__(self):
            await released(release)
            return "Success!"

    serve.run(Hangs.bind())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # One runs, the other waits for the only slot; neither answers in time.
        responses = list(pool.map(lambda _: httpx.get(url, timeout=30), range(2)))
    assert [r.status_code for r in responses] == [408, 408]
    open(release, "w").close()
    assert httpx.get(url, timeout=30).status_code == 200


def test_a_stream_cut_by_the_timeout_breaks_the_connection(tmp_path) -> None:
    url = start(3)
    release = str(tmp_path / "never")

    @serve.deployment(graceful_shutdown_timeout_s=0, max_ongoing_requests=1)
    class BlockOnSecondChunk:
        async def generate_numbers(self):
            for i in range(2):
                yield f"generated {i}"
                await released(release)

        def __call__(self, request: Request) -> StreamingResponse:
            return StreamingResponse(self.generate_numbers(), status_code=200,
                                     media_type="text/plain")

    serve.run(BlockOnSecondChunk.bind())
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200
        chunks = response.iter_text()
        assert next(chunks) == "generated 0"
        with pytest.raises(httpx.RemoteProtocolError):
            next(chunks)


def test_timed_out_requests_are_cancelled_in_the_replica(tmp_path) -> None:
    url = start(0.5)
    cancelled = str(tmp_path / "cancelled")

    @serve.deployment(max_ongoing_requests=10)
    class Hang:
        async def __call__(self):
            try:
                await asyncio.sleep(1000000)
            except asyncio.CancelledError:
                note(cancelled, "cancelled")
                raise

    serve.run(Hang.bind())
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(lambda _: httpx.get(url, timeout=30).status_code, range(10)))
    assert codes == [408] * 10
    wait_for(lambda: len(lines(tmp_path / "cancelled")) == 10,
             message="every timed-out request to be cancelled")


@pytest.mark.parametrize("use_fastapi", [False, True])
def test_a_timeout_cancels_the_handler_and_its_calls(tmp_path, use_fastapi: bool) -> None:
    url = start(0.5)
    events = str(tmp_path / "events")

    @serve.deployment
    async def inner():
        try:
            await asyncio.sleep(1000000)
        except asyncio.CancelledError:
            note(events, "inner cancelled")
            raise

    async def wait_for_cancellation(handle):
        _ = handle.remote()
        try:
            await asyncio.sleep(1000000)
        except asyncio.CancelledError:
            note(events, "outer cancelled")
            raise

    if use_fastapi:
        app = FastAPI()

        @serve.deployment
        @serve.ingress(app)
        class Ingress:
            def __init__(self, handle):
                self._handle = handle

            @app.get("/")
            async def root(self):
                await wait_for_cancellation(self._handle)
    else:
        @serve.deployment
        class Ingress:
            def __init__(self, handle):
                self._handle = handle

            async def __call__(self, request: Request):
                await wait_for_cancellation(self._handle)

    serve.run(Ingress.bind(inner.bind()))
    assert httpx.get(url, timeout=30).status_code == 408
    wait_for(lambda: sorted(lines(tmp_path / "events")) == ["inner cancelled",
                                                            "outer cancelled"],
             message="the handler and its call to be cancelled")


def test_a_request_timed_out_in_the_queue_never_runs(tmp_path) -> None:
    url = start(0.5)
    release = str(tmp_path / "release")
    started = str(tmp_path / "started")

    @serve.deployment(max_ongoing_requests=1)
    class Ingress:
        def __init__(self):
            self._num_requests = 0

        async def __call__(self, *args):
            self._num_requests += 1
            note(started, str(self._num_requests))
            await released(release)
            return self._num_requests

    h = serve.run(Ingress.bind())
    initial_response = h.remote()
    wait_for(lambda: lines(tmp_path / "started") == ["1"], message="the first request to run")
    assert httpx.get(url, timeout=30).status_code == 408
    open(release, "w").close()
    assert initial_response.result(timeout_s=30) == 1
    for i in range(2, 12):
        assert h.remote().result(timeout_s=30) == i


def test_a_child_call_that_outlives_the_timeout_gives_408(tmp_path) -> None:
    url = start(0.5)
    release = str(tmp_path / "release")
    app = FastAPI()

    @serve.deployment
    class Child:
        async def __call__(self):
            await released(release)
            return "ok"

    @serve.deployment
    @serve.ingress(app)
    class Parent:
        def __init__(self, child):
            self.child = child

        @app.get("/")
        async def root(self):
            return await self.child.remote()

    serve.run(Parent.bind(Child.bind()))
    assert httpx.get(url, timeout=30).status_code == 408
    open(release, "w").close()
