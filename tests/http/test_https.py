"""HTTPS from the proxy (``http_options`` ``ssl_certfile``/``ssl_keyfile``, as in Ray
Serve): a self-signed certificate made here with the ``openssl`` tool, and real TLS
clients that trust only it.  Both of the proxy's servers are covered: its own, and
uvicorn (with middlewares).

No ``from __future__ import annotations``: see test_ray_http_routes.py.
"""

import shutil
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from websockets.sync.client import connect

from ladle import serve
from ladle._api.lifecycle import http_port
from ladle.exceptions import RayServeException

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="needs the openssl tool to make a certificate")


def make_certificate(directory: Path, password: str | None = None) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (encrypted with ``password``)."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-keyout", str(key),
               "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
               "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    command += ["-passout", f"pass:{password}"] if password else ["-noenc"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


def trusting(cert: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    return make_certificate(tmp_path)


def start_https(cert: str, key: str, **options: Any) -> int:
    serve.start(http_options={"host": "127.0.0.1", "port": 0, "ssl_certfile": cert,
                              "ssl_keyfile": key, **options})
    port = http_port()
    assert port
    return port


@serve.deployment
class Where:
    def __call__(self, request: Request) -> dict[str, str]:
        return {"scheme": request.url.scheme, "url": str(request.url)}


@pytest.mark.parametrize("middlewares", [[], [Middleware(CORSMiddleware, allow_origins=["*"])]],
                         ids=["own server", "uvicorn"])
def test_https_with_a_trusted_certificate(certificate: tuple[str, str],
                                          middlewares: list[Any]) -> None:
    cert, key = certificate
    port = start_https(cert, key, middlewares=middlewares)
    serve.run(Where.bind(), route_prefix="/where")
    with httpx.Client(verify=trusting(cert), timeout=30) as client:
        for _ in range(3):  # a kept-alive TLS connection serves several requests
            response = client.get(f"https://127.0.0.1:{port}/where")
            assert response.status_code == 200
            assert response.json() == {"scheme": "https",
                                       "url": f"https://127.0.0.1:{port}/where"}
            assert response.headers["x-request-id"]
        assert client.get(f"https://127.0.0.1:{port}/-/healthz").text == "success"

    # A client that does not trust the certificate refuses it; plain HTTP gets no answer.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{port}/where", timeout=30)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/where", timeout=30)
    # And the server goes on serving TLS clients.
    assert httpx.get(f"https://127.0.0.1:{port}/where", verify=trusting(cert), timeout=30).status_code == 200


def test_the_raw_tls_stream_is_http(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    port = start_https(cert, key)
    serve.run(Where.bind(), route_prefix="/where")
    context = trusting(cert)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            tls.sendall(b"GET /where HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            received = b""
            while chunk := tls.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'"scheme":"https"' in received


def test_websocket_over_tls(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    port = start_https(cert, key)
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Echo:
        @app.websocket("/ws")
        async def echo(self, ws: WebSocket) -> None:
            await ws.accept()
            await ws.send_text(f"{ws.url.scheme}: {await ws.receive_text()}")
            await ws.close()

    serve.run(Echo.bind(), route_prefix="/echo")
    context = trusting(cert)
    with connect(f"wss://127.0.0.1:{port}/echo/ws", ssl=context, open_timeout=30) as ws:
        ws.send("hi")
        assert ws.recv(timeout=30) == "wss: hi"


def test_an_encrypted_key_with_its_password(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, password="s3cret")
    port = start_https(cert, key, ssl_keyfile_password="s3cret", ssl_ca_certs=cert)
    serve.run(Where.bind(), route_prefix="/where")
    response = httpx.get(f"https://127.0.0.1:{port}/where", verify=trusting(cert), timeout=30)
    assert response.json()["scheme"] == "https"


@pytest.mark.parametrize("problem", ["wrong password", "missing file", "key of another cert"])
def test_bad_tls_files_fail_serve_start_clearly(tmp_path: Path, problem: str) -> None:
    if problem == "wrong password":
        cert, key = make_certificate(tmp_path, password="s3cret")
        options: dict[str, Any] = {"ssl_keyfile_password": "wrong"}
    elif problem == "missing file":
        cert, key = str(tmp_path / "nope.pem"), str(tmp_path / "nope.key")
        options = {}
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        cert, _ = make_certificate(tmp_path / "a")
        _, key = make_certificate(tmp_path / "b")
        options = {}
    with pytest.raises(RayServeException, match="TLS files") as raised:
        start_https(cert, key, **options)
    assert cert in str(raised.value)
    assert "s3cret" not in str(raised.value) and "wrong" not in str(raised.value)
    assert http_port() is None


def test_only_one_of_the_pair_is_refused_before_starting(certificate: tuple[str, str]) -> None:
    cert, key = certificate
    for options in ({"ssl_certfile": cert}, {"ssl_keyfile": key},
                    {"ssl_keyfile": key, "ssl_certfile": None}):
        with pytest.raises(ValueError, match="Both ssl_keyfile and ssl_certfile"):
            serve.start(http_options={"host": "127.0.0.1", "port": 0, **options})
        assert http_port() is None
