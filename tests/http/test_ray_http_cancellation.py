"""Ray Serve's test_http_cancellation.py, ported by meaning: an HTTP client that goes
away cancels its request, running (the handler and the calls it made see
``asyncio.CancelledError``) or still waiting for a replica (it never runs).

Replicas record what they see in files (tests/http/signals.py) where Ray's tests
use a ``Collector`` actor and a ``SignalActor``.
No ``from __future__ import annotations``: see test_ray_http_routes.py.
"""

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from ladle import serve
from ladle.exceptions import RequestCancelledError
from tests.conftest import lines, wait_for
from tests.http.signals import note, released


def give_up_after_a_moment(url: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=0.5)


@pytest.mark.parametrize("use_fastapi", [False, True])
def test_disconnect_cancels_the_handler_and_its_calls(http_url: str, tmp_path,
                                                      use_fastapi: bool) -> None:
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
    give_up_after_a_moment(http_url)
    wait_for(lambda: sorted(lines(tmp_path / "events")) == ["inner cancelled",
                                                            "outer cancelled"],
             message="the handler and its call to be cancelled")


def test_disconnect_while_waiting_for_a_replica(http_url: str, tmp_path) -> None:
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
    give_up_after_a_moment(http_url)
    open(release, "w").close()
    # The HTTP request never reached the replica: the count goes on from 1.
    assert initial_response.result(timeout_s=30) == 1
    for i in range(2, 12):
        assert h.remote().result(timeout_s=30) == i


def parent_and_child(events: str, release: str):
    @serve.deployment(max_ongoing_requests=1)
    class Child:
        async def __call__(self):
            note(events + ".started", "child")
            try:
                await released(release)
            except asyncio.CancelledError:
                note(events, "Child_CancelledError")
                raise

    @serve.deployment
    class Parent:
        def __init__(self, child):
            self.child = child

        async def __call__(self):  # no parameters: HTTP calls it without the request
            try:
                await self.child.remote()
            except asyncio.CancelledError:
                note(events, "Parent_CancelledError")
                raise
            except RequestCancelledError:
                note(events, "Parent_RequestCancelledError")
                raise

    return Parent.bind(Child.bind())


def test_what_a_parent_and_child_see_when_the_client_goes(http_url: str, tmp_path) -> None:
    serve.run(parent_and_child(str(tmp_path / "events"), str(tmp_path / "never")))
    give_up_after_a_moment(http_url)
    wait_for(lambda: len(lines(tmp_path / "events")) >= 2, message="both to be cancelled")
    assert sorted(lines(tmp_path / "events")) == ["Child_CancelledError",
                                                  "Parent_CancelledError"]


def test_what_a_parent_sees_when_its_call_was_still_queued(http_url: str, tmp_path) -> None:
    events = str(tmp_path / "events")
    h = serve.run(parent_and_child(events, str(tmp_path / "never")))
    first = h.remote()  # takes the child's only slot
    wait_for(lambda: lines(tmp_path / "events.started"), message="the child to be busy")
    give_up_after_a_moment(http_url)
    wait_for(lambda: "Parent_CancelledError" in lines(tmp_path / "events"),
             message="the parent to be cancelled")
    first.cancel()
    with pytest.raises(RequestCancelledError):
        first.result(timeout_s=30)
