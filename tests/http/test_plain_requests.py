"""Deployments without ingress over HTTP: the Request they get, and what they return.

``__call__`` gets a ``starlette.requests.Request``; its return value becomes a
response (``str`` → text/plain, ``bytes`` → raw, a ``Response`` as is, anything
else → JSON).  Streaming responses reach the client chunk by chunk.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from ladle import serve


@serve.deployment
class Echo:
    """Everything the Request exposes, as JSON."""

    async def __call__(self, request: Request) -> dict:
        body = await request.body()
        is_json = request.headers.get("content-type") == "application/json"
        return {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "query_list": request.query_params.getlist("tag"),
            "header": request.headers.get("x-custom"),
            "body": body.decode("latin-1"),
            "json": await request.json() if is_json else None,
            "is_request": isinstance(request, Request),
        }


@serve.deployment
class Returns:
    """Returns the Python value named by ``?kind=``."""

    def __call__(self, request: Request):
        kind = request.query_params["kind"]
        if kind == "str":
            return "héllo"
        if kind == "bytes":
            return b"\x00\x01raw\xff"
        if kind == "dict":
            return {"a": 1, "b": [1, 2]}
        if kind == "list":
            return [1, "two", None]
        if kind == "int":
            return 42
        if kind == "response":
            response = Response(b"a,b\n1,2\n", status_code=201, headers={"x-made": "here"},
                                media_type="text/csv")
            response.set_cookie("session", "abc123", httponly=True)
            return response
        if kind == "json_response":
            return JSONResponse({"ok": True}, status_code=202, headers={"x-json": "yes"})
        if kind == "plain_response":
            return PlainTextResponse("teapot", status_code=418)
        if kind == "redirect":
            return RedirectResponse("/elsewhere?x=1")
        raise ValueError(kind)


def test_request_fields_reach_the_deployment(http_url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        got = client.get("/echo/some/path", params=[("q", "1"), ("tag", "x"), ("tag", "y")],
                         headers={"X-Custom": "hdr-value"}).json()
        assert got["method"] == "GET"
        assert got["path"] == "/echo/some/path"
        assert got["query"]["q"] == "1"
        assert got["query_list"] == ["x", "y"]
        assert got["header"] == "hdr-value"
        assert got["body"] == ""
        assert got["json"] is None
        assert got["is_request"] is True

        raw = bytes(range(256))
        got = client.put("/echo", content=raw).json()
        assert got["method"] == "PUT"
        assert got["body"].encode("latin-1") == raw

        got = client.post("/echo", json={"x": [1, 2], "y": "z"}).json()
        assert got["method"] == "POST"
        assert got["json"] == {"x": [1, 2], "y": "z"}

        big = os.urandom(256 * 1024)
        got = client.post("/echo", content=big).json()
        assert got["body"].encode("latin-1") == big

        assert client.delete("/echo").json()["method"] == "DELETE"
        assert client.patch("/echo", content=b"p").json()["body"] == "p"


def test_return_values_are_converted(http_url: str) -> None:
    serve.run(Returns.bind(), name="returns", route_prefix="/r")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        def get(kind: str) -> httpx.Response:
            return client.get("/r", params={"kind": kind})

        text = get("str")
        assert text.status_code == 200
        assert text.headers["content-type"].startswith("text/plain")
        assert text.text == "héllo"

        raw = get("bytes")
        assert raw.status_code == 200
        assert raw.content == b"\x00\x01raw\xff"
        assert raw.headers["content-type"] == "text/plain"  # what Ray Serve sends for bytes

        for kind, value in [("dict", {"a": 1, "b": [1, 2]}), ("list", [1, "two", None]),
                            ("int", 42)]:
            response = get(kind)
            assert response.status_code == 200
            assert response.headers["content-type"] == "application/json"
            assert response.json() == value


def test_response_objects_pass_through(http_url: str) -> None:
    serve.run(Returns.bind(), name="returns", route_prefix="/r")
    with httpx.Client(base_url=http_url, timeout=10, follow_redirects=False) as client:
        def get(kind: str) -> httpx.Response:
            return client.get("/r", params={"kind": kind})

        made = get("response")
        assert made.status_code == 201
        assert made.headers["x-made"] == "here"
        assert made.headers["content-type"].startswith("text/csv")
        assert made.content == b"a,b\n1,2\n"
        assert made.cookies["session"] == "abc123"
        assert "httponly" in made.headers["set-cookie"].lower()

        js = get("json_response")
        assert js.status_code == 202
        assert js.headers["x-json"] == "yes"
        assert js.json() == {"ok": True}

        plain = get("plain_response")
        assert plain.status_code == 418
        assert plain.headers["content-type"].startswith("text/plain")
        assert plain.text == "teapot"

        redirect = get("redirect")
        assert redirect.status_code == 307
        assert redirect.headers["location"] == "/elsewhere?x=1"


async def _wait_for_file(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


def _wait_for_file_sync(path: str) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


@serve.deployment
class AsyncStreamer:
    """An async generator response that blocks after its first chunk until released."""

    def __init__(self, release: str) -> None:
        self.release = release

    async def __call__(self, request: Request) -> StreamingResponse:
        async def chunks():
            yield b"first;"
            await _wait_for_file(self.release)
            for i in range(3):
                yield f"more{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain",
                                 headers={"x-stream": "async"})


@serve.deployment
class SyncStreamer:
    """A sync deployment returning a sync generator response, same protocol."""

    def __init__(self, release: str) -> None:
        self.release = release

    def __call__(self, request: Request) -> StreamingResponse:
        def chunks():
            yield b"first;"
            _wait_for_file_sync(self.release)
            for i in range(3):
                yield f"more{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain",
                                 headers={"x-stream": "sync"})


def _read_first_chunk_then_release(client: httpx.Client, path: str, release: Path,
                                   kind: str) -> None:
    with client.stream("GET", path) as response:
        assert response.status_code == 200
        assert response.headers["x-stream"] == kind
        assert "x-request-id" in response.headers
        chunks = response.iter_raw()
        # The generator is blocked until `release` exists: this chunk came alone.
        assert next(chunks) == b"first;"
        assert not release.exists()
        release.touch()
        rest = b"".join(chunks)
    assert rest == b"more0;more1;more2;"


def test_streaming_response_arrives_chunk_by_chunk(http_url: str, tmp_path: Path) -> None:
    async_release, sync_release = tmp_path / "async-release", tmp_path / "sync-release"
    serve.run(AsyncStreamer.bind(str(async_release)), name="astream", route_prefix="/astream")
    serve.run(SyncStreamer.bind(str(sync_release)), name="sstream", route_prefix="/sstream")
    with httpx.Client(base_url=http_url, timeout=20) as client:
        _read_first_chunk_then_release(client, "/astream", async_release, "async")
        _read_first_chunk_then_release(client, "/sstream", sync_release, "sync")


def test_async_sync_and_function_deployments(http_url: str) -> None:
    @serve.deployment
    class SyncClass:
        def __call__(self, request: Request) -> str:
            return f"sync-class {request.query_params.get('v')} {request.method}"

    @serve.deployment
    class AsyncClass:
        async def __call__(self, request: Request) -> dict:
            await asyncio.sleep(0)
            return {"async-class": (await request.body()).decode()}

    @serve.deployment
    def sync_function(request: Request) -> str:
        return f"sync-function {request.url.path}"

    @serve.deployment
    async def async_function(request: Request) -> bytes:
        return b"async-function " + await request.body()

    serve.run(SyncClass.bind(), name="sc", route_prefix="/sc")
    serve.run(AsyncClass.bind(), name="ac", route_prefix="/ac")
    serve.run(sync_function.bind(), name="sf", route_prefix="/sf")
    serve.run(async_function.bind(), name="af", route_prefix="/af")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        assert client.get("/sc", params={"v": "7"}).text == "sync-class 7 GET"
        assert client.post("/ac", content=b"payload").json() == {"async-class": "payload"}
        assert client.get("/sf/x").text == "sync-function /sf/x"
        assert client.post("/af", content=b"data").content == b"async-function data"


@serve.deployment
class BusyStream:
    """A StreamingResponse whose generator keeps the loop busy after its first chunk."""

    def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        go = request.query_params["go"]

        async def chunks() -> Any:
            yield b"first;"
            deadline = time.monotonic() + 30
            while not os.path.exists(go) and time.monotonic() < deadline:
                pass  # never gives the loop a turn
            yield b"second"

        return StreamingResponse(chunks(), media_type="text/plain")


def test_the_first_streamed_chunk_reaches_the_client_at_once(http_url: str, tmp_path: Any) -> None:
    serve.run(BusyStream.bind(), route_prefix="/busy")
    go = tmp_path / "go"
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{http_url}/busy", params={"go": str(go)}) as response:
            chunks = response.iter_raw()
            assert next(chunks) == b"first;"  # before "go" exists: nothing else could come
            go.touch()
            assert b"".join(chunks) == b"second"
