"""Nothing an HTTP client sends is unpickled, by the proxy or by a replica.

A pickle that runs a shell command when loaded (it creates a marker file) is posted as a
body under every content type a pickle could pass for, and sent in the path and the
query string, to a plain deployment and to a FastAPI ingress: the bytes arrive intact
as bytes, and the marker never appears.  A control shows the payload is live.
(Tracebacks reach clients only in debug mode: tests/http/test_status_codes.py.)

No ``from __future__ import annotations``: FastAPI reads the route annotations.
"""

import hashlib
import os
import pickle
import subprocess
import sys
import urllib.parse
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from starlette.requests import Request as StarletteRequest

from ladle import serve
from ladle._api.lifecycle import http_port


class RunsCommand:
    """Unpickling this runs ``command`` (the classic malicious ``__reduce__``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def digest(body: bytes) -> dict:
    return {"len": len(body), "sha": hashlib.sha256(body).hexdigest()}


@serve.deployment
class Plain:
    async def __call__(self, request: StarletteRequest) -> dict:
        return {"body": digest(await request.body()), "path": request.scope["path"],
                "query": dict(request.query_params)}


api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Api:
    @api.post("/upload")
    async def upload(self, request: Request) -> dict:
        return {"body": digest(await request.body()), "path": request.scope["path"],
                "query": dict(request.query_params)}

    @api.get("/items/{item}")
    def item(self, item: str, q: str = "") -> dict:
        return {"item": item, "q": q}


def test_pickles_from_http_clients_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payloads = [pickle.dumps(RunsCommand(f"touch {marker}"), protocol=p) for p in (0, 2, 5)]

    # Control: these bytes do run the command when something unpickles them.
    control = tmp_path / "control"
    live = pickle.dumps(RunsCommand(f"touch {control}"), protocol=5)
    load = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", load], input=live, check=True, timeout=30)
    assert control.exists()

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    serve.run(Plain.bind(), name="plain", route_prefix="/plain")
    serve.run(Api.bind(), name="api", route_prefix="/api")
    url = f"http://127.0.0.1:{http_port()}"
    content_types = ["application/octet-stream", "application/python-pickle",
                     "application/x-python-serialize", "application/x-pickle",
                     "application/json", "text/plain", None]
    with httpx.Client(base_url=url, timeout=10) as client:
        for payload in payloads:
            as_text = urllib.parse.quote(payload.decode("latin-1"), safe="")
            for route in ("/plain/upload", "/api/upload"):
                for content_type in content_types:
                    headers = {"content-type": content_type} if content_type else {}
                    response = client.post(route, content=payload, headers=headers)
                    assert response.status_code == 200, response.text
                    assert response.json()["body"] == digest(payload)
                response = client.post(f"{route}?p={as_text}", content=b"")
                assert response.status_code == 200
                assert response.json()["query"] == {"p": payload.decode("latin-1")}
            response = client.get("/api/items/x", params={"q": payload.decode("latin-1")})
            assert response.json() == {"item": "x", "q": payload.decode("latin-1")}
            response = client.get(f"/plain/{as_text}")
            assert response.status_code == 200
            if payload.isascii():
                assert response.json()["path"] == "/plain/" + payload.decode()
    assert not marker.exists(), "something unpickled what an HTTP client sent"
