"""What HTTP passes to a plain deployment's ``__call__`` (or function), as Ray Serve:
nothing to one declared without parameters, else the ``Request``.  Both ways a sync
``__call__`` is answered (a worker thread alone up to 8 slots, the loop above) and
async ones; the signature is read once per replica."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.requests import Request

from ladle import serve


@pytest.mark.parametrize("max_ongoing_requests", [5, 100])
def test_no_parameters_no_request(http_url: str, max_ongoing_requests: int) -> None:
    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    class Sync:
        def __call__(self) -> str:
            return "sync"

    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    class Async:
        async def __call__(self) -> str:
            return "async"

    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    def sync_function() -> str:
        return "sync function"

    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    async def async_function() -> str:
        return "async function"

    handles = {}
    for name, deployment in (("sync", Sync), ("async", Async),
                             ("sync-function", sync_function),
                             ("async-function", async_function)):
        handles[name] = serve.run(deployment.bind(), name=name, route_prefix=f"/{name}")
    with httpx.Client(base_url=http_url, timeout=30) as client:
        for name in handles:
            for _ in range(3):
                response = client.get(f"/{name}", params={"ignored": "yes"})
                assert (response.status_code, response.text) == (
                    200, name.replace("-", " ")), name
    # Handles call it as they always did.
    assert handles["sync"].remote().result(timeout_s=30) == "sync"


@pytest.mark.parametrize("max_ongoing_requests", [5, 100])
def test_any_parameter_gets_the_request(http_url: str, max_ongoing_requests: int) -> None:
    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    class Star:
        def __call__(self, *args: Any) -> str:
            return f"{len(args)} {type(args[0]).__name__} {args[0].query_params['q']}"

    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    class Optional:
        async def __call__(self, request: Request | None = None) -> str:
            return type(request).__name__

    serve.run(Star.bind(), name="star", route_prefix="/star")
    serve.run(Optional.bind(), name="optional", route_prefix="/optional")
    assert httpx.get(f"{http_url}/star", params={"q": "x"}).text == "1 Request x"
    assert httpx.get(f"{http_url}/optional").text == "Request"


def test_an_error_in_a_no_parameter_entrypoint_is_a_500(http_url: str) -> None:
    @serve.deployment
    def fails() -> None:
        raise KeyError("nope")

    serve.run(fails.bind(), route_prefix="/fails")
    response = httpx.get(f"{http_url}/fails")
    assert (response.status_code, response.text) == (500, "Internal Server Error")
