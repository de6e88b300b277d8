"""A request timed out or cancelled at the ingress cancels the calls it made, all the way down.

The chain is Ingress -> Middle -> Leaf (unary), and Ingress -> Leaf
(streaming).  Each records when it starts and when it sees
``asyncio.CancelledError`` in a log file that the test polls.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ladle import serve
from ladle._api.lifecycle import http_port
from ladle.exceptions import RequestCancelledError
from ladle.handle import DeploymentHandle
from tests.conftest import wait_for


def record(log: str, event: str) -> None:
    with open(log, "a") as f:
        f.write(event + "\n")


def events(log: Path) -> set[str]:
    try:
        return set(log.read_text().splitlines())
    except FileNotFoundError:
        return set()


@serve.deployment
class Leaf:
    def __init__(self, log: str) -> None:
        self.log = log

    async def wait_forever(self, tag: str) -> None:
        record(self.log, f"start:leaf:{tag}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            record(self.log, f"cancelled:leaf:{tag}")
            raise

    async def ticks(self, tag: str) -> AsyncIterator[str]:
        record(self.log, f"start:leaf:{tag}")
        try:
            yield "tick"
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            record(self.log, f"cancelled:leaf:{tag}")
            raise


@serve.deployment
class Middle:
    def __init__(self, leaf: DeploymentHandle, log: str) -> None:
        self.leaf = leaf
        self.log = log

    async def __call__(self, tag: str) -> None:
        record(self.log, f"start:middle:{tag}")
        try:
            await self.leaf.wait_forever.remote(tag)
        except asyncio.CancelledError:
            record(self.log, f"cancelled:middle:{tag}")
            raise


@serve.deployment
class Ingress:
    def __init__(self, middle: DeploymentHandle, leaf: DeploymentHandle, log: str) -> None:
        self.middle = middle
        self.leaf = leaf
        self.log = log

    async def call(self, tag: str) -> None:
        record(self.log, f"start:ingress:{tag}")
        try:
            await self.middle.remote(tag)
        except asyncio.CancelledError:
            record(self.log, f"cancelled:ingress:{tag}")
            raise

    async def stream(self, tag: str) -> None:
        record(self.log, f"start:ingress:{tag}")
        try:
            async for _ in self.leaf.options(stream=True).ticks.remote(tag):
                pass
        except asyncio.CancelledError:
            record(self.log, f"cancelled:ingress:{tag}")
            raise

    async def __call__(self, request: Any) -> None:
        tag = request.query_params["tag"]
        if request.query_params.get("stream"):
            await self.stream(tag)
        else:
            await self.call(tag)


def chain(log: Path) -> Any:
    leaf = Leaf.bind(str(log))
    return Ingress.bind(Middle.bind(leaf, str(log)), leaf, str(log))


def unary_chain(tag: str) -> set[str]:
    return {f"{what}:{where}:{tag}" for what in ("start", "cancelled")
            for where in ("ingress", "middle", "leaf")}


def stream_chain(tag: str) -> set[str]:
    return {f"{what}:{where}:{tag}" for what in ("start", "cancelled")
            for where in ("ingress", "leaf")}


@pytest.fixture
def timeout_url() -> Iterator[str]:
    """A proxy whose request_timeout_s is 1 s."""
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": 1.0})
    yield f"http://127.0.0.1:{http_port()}"
    serve.shutdown()


def test_http_request_timeout_cancels_the_downstream_calls(timeout_url: str,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "log"
    serve.run(chain(log), name="chain", route_prefix="/chain")

    response = httpx.get(f"{timeout_url}/chain", params={"tag": "timeout"}, timeout=10)
    assert response.status_code == 408
    wait_for(lambda: unary_chain("timeout") <= events(log),
             message="the ingress, middle and leaf calls to be cancelled")

    response = httpx.get(f"{timeout_url}/chain", params={"tag": "stream-timeout", "stream": "1"},
                         timeout=10)
    assert response.status_code == 408
    wait_for(lambda: stream_chain("stream-timeout") <= events(log),
             message="the ingress and its downstream stream to be cancelled")


def test_cancelled_ingress_cancels_the_downstream_calls(http_url: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    handle = serve.run(chain(log), name="chain", route_prefix="/chain")

    # A handle call cancelled by its caller.
    response = handle.call.remote("handle")
    wait_for(lambda: "start:leaf:handle" in events(log), message="the chain to start")
    response.cancel()
    wait_for(lambda: unary_chain("handle") <= events(log),
             message="the ingress, middle and leaf calls to be cancelled")
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)

    # The asyncio task awaiting a streaming ingress call cancelled.
    async def cancel_task() -> None:
        async def call() -> None:
            await handle.stream.remote("task")

        task = asyncio.ensure_future(call())
        await asyncio.to_thread(wait_for, lambda: "start:leaf:task" in events(log),
                                message="the stream to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_task())
    wait_for(lambda: stream_chain("task") <= events(log),
             message="the ingress and its downstream stream to be cancelled")

    # An HTTP client that goes away.
    port = int(http_url.rsplit(":", 1)[1])
    for tag, query in (("gone", ""), ("stream-gone", "&stream=1")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"GET /chain?tag={tag}{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            wait_for(lambda: f"start:leaf:{tag}" in events(log), message="the chain to start")
        expected = stream_chain(tag) if query else unary_chain(tag)
        wait_for(lambda: expected <= events(log),
                 message=f"the calls of the disconnected request to be cancelled ({tag})")

    # Every call that started was cancelled: nothing is left running.
    started = {e.partition(":")[2] for e in events(log) if e.startswith("start:")}
    cancelled = {e.partition(":")[2] for e in events(log) if e.startswith("cancelled:")}
    assert started == cancelled
