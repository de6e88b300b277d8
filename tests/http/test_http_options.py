"""``serve.start(http_options=...)``: where the proxy listens, if there is one, how it serves.

``root_path``, as Ray Serve documents it ("root path to mount the serve
application; all deployment routes are prefixed with this path"): clients
address ``{root_path}{route_prefix}/...``; the application sees the full path,
with ``root_path + route_prefix`` as the ASGI ``root_path``; the built-in
``/-/`` routes move under it too, and paths outside it are 404.  (uvicorn's own
``--root-path`` means the opposite, a prefix an upstream proxy has already
stripped, and would prepend it a second time.)
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import httpx
import psutil
import pytest
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request

from ladle import serve
from ladle._api.lifecycle import http_port
from ladle.exceptions import RayServeException
from ladle.serve.config import HTTPOptions, ProxyLocation
from tests.conftest import wait_for


def free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_processes() -> list[psutil.Process]:
    """This test process's live HTTP proxies (their command line ends with "proxy")."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[-1:] == ["proxy"] and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def live_children() -> list[psutil.Process]:
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"path": request.url.path, "root_path": request.scope["root_path"],
                "query": dict(request.query_params)}

    def ping(self) -> str:
        return "pong"


# ---------------------------------------------------------------- host, port


@pytest.mark.parametrize("how", ["specific port", "port 0", "HTTPOptions"])
def test_host_and_port(how: str) -> None:
    port = 0 if how == "port 0" else free_port()
    if how == "HTTPOptions":
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    else:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    actual = http_port()
    assert actual is not None and actual > 0
    if port:
        assert actual == port
    assert len(proxy_processes()) == 1

    serve.run(Echo.bind(), route_prefix="/echo")
    response = httpx.get(f"http://127.0.0.1:{actual}/echo/x", params={"a": "1"})
    assert response.status_code == 200
    assert response.json() == {"path": "/echo/x", "root_path": "/echo", "query": {"a": "1"}}
    assert httpx.get(f"http://127.0.0.1:{actual}/-/healthz").text == "success"


# ------------------------------------------------------------------ location


@pytest.mark.parametrize("options", [
    {"http_options": {"port": 0, "location": "HeadOnly"}},
    {"http_options": {"port": 0, "location": "EveryNode"}},  # one machine: one proxy
    {"http_options": {"port": 0, "location": ProxyLocation.EveryNode}},
    {"http_options": {"port": 0}, "proxy_location": "EveryNode"},
    {"http_options": {"port": 0}, "proxy_location": ProxyLocation.HeadOnly},
], ids=["HeadOnly", "EveryNode", "enum", "proxy_location", "proxy_location-enum"])
def test_locations_with_one_proxy(options: dict[str, Any]) -> None:
    serve.start(**options)
    assert len(proxy_processes()) == 1
    port = http_port()
    serve.run(Echo.bind(), route_prefix="/echo")
    assert httpx.get(f"http://127.0.0.1:{port}/echo").json()["path"] == "/echo"


@pytest.mark.parametrize("options", [
    {"http_options": {"location": "NoServer"}},
    {"http_options": {"location": None}},
    {"http_options": {"location": ProxyLocation.Disabled}},
    {"proxy_location": "NoServer"},
    {"proxy_location": ProxyLocation.Disabled},
    {"http_options": {"port": 0, "location": "HeadOnly"}, "proxy_location": "Disabled"},
    {"http_options": {"host": None}},
    {"http_options": {"host": None}, "proxy_location": "HeadOnly"},
], ids=["NoServer", "None", "Disabled", "proxy_location", "proxy_location-enum",
        "proxy_location-wins", "no-host", "no-host-wins"])
def test_locations_without_http(options: dict[str, Any]) -> None:
    serve.start(**options)
    handle = serve.run(Echo.bind(), route_prefix="/echo")
    assert handle.ping.remote().result() == "pong"  # Python calls work
    assert http_port() is None
    assert proxy_processes() == []  # no proxy process at all
    assert len(live_children()) == 1  # the one replica


# --------------------------------------------------------------- middlewares


def test_cors_middleware_from_the_seed() -> None:
    # http-and-python-calls.rst, "Enabling CORS and other HTTP middlewares".
    serve.start(
        http_options={"host": "127.0.0.1", "port": 0, "middlewares": [
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
        ]})
    serve.run(Echo.bind(), route_prefix="/echo")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}") as client:
        preflight = client.options("/echo", headers={
            "Origin": "http://example.com", "Access-Control-Request-Method": "PUT"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "PUT" in preflight.headers["access-control-allow-methods"]

        simple = client.get("/echo", headers={"Origin": "http://example.com"})
        assert simple.status_code == 200 and simple.json()["path"] == "/echo"
        assert simple.headers["access-control-allow-origin"] == "*"
        # The middleware wraps the proxy's own answers too.
        missing = client.get("/nowhere", headers={"Origin": "http://example.com"})
        assert missing.status_code == 404
        assert missing.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-origin" not in client.get("/echo").headers


# ---------------------------------------------------------- request timeout


@serve.deployment
class Slow:
    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def __call__(self, request: Request) -> str:
        if "fast" in request.query_params:
            return "quick"
        self.started += 1
        try:
            await asyncio.Event().wait()  # never set: only the timeout ends this
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return "unreachable"

    def counts(self) -> tuple[int, int]:
        return self.started, self.cancelled


def test_request_timeout_gives_408_and_cancels() -> None:
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "request_timeout_s": 0.5})
    handle = serve.run(Slow.bind(), route_prefix="/slow")
    url = f"http://127.0.0.1:{http_port()}/slow"
    assert httpx.get(url, params={"fast": "1"}, timeout=30).text == "quick"
    timed_out = httpx.get(url, timeout=30)
    assert timed_out.status_code == 408
    assert timed_out.headers["x-request-id"]
    wait_for(lambda: handle.counts.remote().result() == (1, 1),
             message="the timed-out request to be cancelled on the replica")


# ----------------------------------------------------------------- root_path


def test_root_path_is_put_back_in_front_of_every_path() -> None:
    """Ray Serve 2.60's root_path: an upstream proxy mounts ladle at /root and strips
    it, so requests arrive without it; apps see it in ``path`` and ``root_path``."""
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "root_path": "/root"})
    serve.run(Echo.bind(), name="echo", route_prefix="/prefix")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port()}") as client:
        inside = client.get("/prefix/a/b", params={"q": "1"})
        assert inside.status_code == 200
        assert inside.json() == {"path": "/root/prefix/a/b", "root_path": "/root/prefix",
                                 "query": {"q": "1"}}
        assert client.get("/prefix").json()["path"] == "/root/prefix"
        assert client.get("/-/healthz").text == "success"
        assert client.get("/-/routes").json() == {"/prefix": "echo"}
        # A path that still holds the root path was not stripped: not ours.
        missing = client.get("/root/prefix/a")
        assert missing.status_code == 404
        assert "/root/root/prefix/a" in missing.text
        assert client.get("/other").status_code == 404


# ---------------------------------------------------------------- keep-alive


def test_idle_kept_alive_connection_is_closed_after_the_timeout() -> None:
    timeout_s = 1
    serve.start(http_options={"host": "127.0.0.1", "port": 0,
                              "keep_alive_timeout_s": timeout_s})
    with socket.create_connection(("127.0.0.1", http_port()), timeout=10) as sock:
        sock.sendall(b"GET /-/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        received = b""
        deadline = time.monotonic() + timeout_s + 5
        while True:  # read the response, then wait for the server to hang up
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the idle connection was still open: {received!r}"
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue  # the assert above ends it
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    # No application yet: Ray Serve's "not ready" answer, on a kept-alive connection.
    assert head.startswith(b"HTTP/1.1 503") and body == b"Route table is not populated yet."
    assert b"connection: close" not in head.lower()  # kept alive, then closed when idle


# ------------------------------------------------------------------- errors


def test_taken_port_is_a_clear_error_and_leaves_nothing_behind() -> None:
    before = {p.pid for p in live_children()}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RayServeException, match=f"127.0.0.1:{port}"):
            serve.start(http_options={"host": "127.0.0.1", "port": port})
        assert http_port() is None
        wait_for(lambda: {p.pid for p in live_children()} <= before,
                 message="the failed start's processes to exit")
    # Nothing half-started is left in the way of the next start.
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    assert len(proxy_processes()) == 1


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"http_options": {"nope": 1}}, (TypeError, ValueError), "nope"),
    ({"http_options": {"port": "eighty"}}, (TypeError, ValueError), "port"),
    ({"http_options": {"port": 70000}}, ValueError, "port"),
    ({"http_options": {"port": -1}}, ValueError, "port"),
    ({"http_options": {"location": "Everywhere"}}, ValueError, "Everywhere"),
    ({"http_options": {"request_timeout_s": -1}}, ValueError, "request_timeout_s"),
    ({"http_options": {"keep_alive_timeout_s": "long"}}, (TypeError, ValueError),
     "keep_alive_timeout_s"),
    ({"http_options": {"root_path": "root"}}, ValueError, "root_path"),
    ({"http_options": {"middlewares": [CORSMiddleware]}}, TypeError, "Middleware"),
    ({"http_options": 8000}, TypeError, "http_options"),
    ({"proxy_location": "Nowhere"}, ValueError, "Nowhere"),
    ({"http_port": 8000}, TypeError, "http_port"),
], ids=lambda value: repr(value) if isinstance(value, dict) else None)
def test_bad_http_options_are_rejected_before_starting(
        kwargs: dict[str, Any], error: Any, words: str) -> None:
    with pytest.raises(error, match=words):
        serve.start(**kwargs)
    assert http_port() is None
    assert live_children() == []


def test_second_start_ignores_its_options_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    first, second = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": first})
    logger = logging.getLogger("ladle")
    logger.addHandler(caplog.handler)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": second})
    finally:
        logger.removeHandler(caplog.handler)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "http_options are ignored" in warnings[0]
    assert http_port() == first
    assert len(proxy_processes()) == 1
    serve.run(Echo.bind(), route_prefix="/echo")
    assert httpx.get(f"http://127.0.0.1:{first}/echo").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{second}/echo")
