"""Ray Serve's test_http_headers.py, ported by meaning: the request id of an HTTP
request (the client's ``X-Request-ID`` or a new UUID 4) reaches user code and comes
back as the ``x-request-id`` response header, for plain, FastAPI and Response answers.

User code reads the id from ladle's request context (Ray's tests read
``ray.serve.context._get_serve_request_context()``, a private API).
No ``from __future__ import annotations``: see test_ray_http_routes.py.
"""

import asyncio
import uuid

import httpx
import pytest
from fastapi import FastAPI
from starlette.responses import Response

from ladle import serve
from ladle._core.context import current_request


@pytest.mark.parametrize("max_ongoing_requests", [5, 100])  # a worker thread answers, or the loop
def test_a_new_request_id_is_a_uuid4_and_comes_back(http_url: str,
                                                    max_ongoing_requests: int) -> None:
    @serve.deployment(max_ongoing_requests=max_ongoing_requests)
    class Model:
        def __call__(self):
            return current_request().request_id

    serve.run(Model.bind())
    response = httpx.get(http_url)
    assert response.status_code == 200
    assert response.text == response.headers["x-request-id"]
    assert str(uuid.UUID(response.text, version=4)) == response.text
    assert httpx.get(http_url).text != response.text


def say_one_plain():
    @serve.deployment
    class Model:
        def __call__(self) -> int:
            assert current_request().request_id == "123-234"
            return 1

    return Model


def say_one_fastapi():
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Model:
        @app.get("/")
        def say_hi(self) -> int:
            assert current_request().request_id == "123-234"
            return 1

    return Model


def say_one_response():
    @serve.deployment
    class Model:
        def __call__(self):
            assert current_request().request_id == "123-234"
            return Response("1", media_type="application/json")

    return Model


@pytest.mark.parametrize("make", [say_one_plain, say_one_fastapi, say_one_response])
def test_the_client_request_id_is_used_and_returned(http_url: str, make) -> None:
    serve.run(make().bind())
    response = httpx.get(http_url, headers={"X-Request-ID": "123-234"})
    assert response.status_code == 200
    assert response.json() == 1
    assert response.headers["X-Request-ID"] == "123-234"


def test_concurrent_requests_sharing_one_request_id(http_url: str) -> None:
    """Requests in flight together with the same id each get their own answer."""
    app = FastAPI()

    @serve.deployment(num_replicas=3)
    @serve.ingress(app)
    class MyFastAPIDeployment:
        @app.post("/hello")
        def root(self, user_input: dict[str, str]) -> dict[str, str]:
            return {"app_name": user_input["app_name"],
                    "serve_context_request_id": current_request().request_id}

    serve.run(MyFastAPIDeployment.bind())
    request_id = f"rid_{uuid.uuid4()}"

    async def send(client: httpx.AsyncClient, body: dict[str, str]) -> None:
        response = await client.post("/hello", json=body, headers={"x-request-id": request_id})
        assert response.json() == {"app_name": body["app_name"],
                                   "serve_context_request_id": request_id}
        assert response.headers["x-request-id"] == request_id

    async def main() -> None:
        async with httpx.AsyncClient(base_url=http_url, timeout=30) as client:
            await asyncio.gather(*(send(client, {"app_name": f"an_{uuid.uuid4()}"})
                                   for _ in range(20)))

    asyncio.run(main())
