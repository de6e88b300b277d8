"""Ray Serve's test_http_routes.py, ported by meaning: route prefixes, /-/healthz and
/-/routes, longest-prefix matching, redirects under a prefix, default errors.

Not ported: ``get_application_url`` (a Ray test helper) and killing the replica
with ``ray.kill`` (here the replica's process dies by SIGKILL instead).
No ``from __future__ import annotations``: FastAPI reads the annotations of
routes shipped by value, whose globals hold only what their code names.
"""

import os
import signal

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.responses import RedirectResponse

from ladle import serve
from tests.conftest import wait_for


def test_route_prefix_validation(http_url: str) -> None:
    @serve.deployment
    class D:
        pass

    for bad in ("hello", "/hello/", "/{hello}"):
        with pytest.raises(ValueError):
            serve.run(D.bind(), route_prefix=bad)


def test_healthz_and_routes_wait_for_the_first_route(http_url: str) -> None:
    @serve.deployment
    class D1:
        def __call__(self, *args):
            return "hi"

    not_ready = "Route table is not populated yet."
    for path in ("/-/healthz", "/-/routes"):
        response = httpx.get(f"{http_url}{path}")
        assert (response.status_code, response.text) == (503, not_ready)
        assert response.headers["x-request-id"]
    # Not exposed over HTTP: still nothing to route to.
    serve.run(D1.bind(), name="hidden", route_prefix=None)
    response = httpx.get(f"{http_url}/-/healthz")
    assert (response.status_code, response.text) == (503, not_ready)

    serve.run(D1.bind(), name="shown", route_prefix="/")
    response = httpx.get(f"{http_url}/-/healthz")
    assert (response.status_code, response.text) == (200, "success")
    # Once ready, the proxy stays ready: an application may come back at any time.
    serve.delete("shown")
    assert httpx.get(f"{http_url}/-/routes").json() == {}
    assert httpx.get(f"{http_url}/-/healthz").status_code == 200


def test_routes_endpoint_lists_each_application(http_url: str) -> None:
    @serve.deployment
    class D1:
        def __call__(self, *args):
            return "D1"

    @serve.deployment
    class D2:
        def __call__(self, *args):
            return "D2"

    serve.run(D1.bind(), name="app1", route_prefix="/D1")
    serve.run(D2.bind(), name="app2", route_prefix="/hello/world")
    assert httpx.get(f"{http_url}/-/routes").json() == {"/D1": "app1", "/hello/world": "app2"}
    for path, text in (("/D1", "D1"), ("/hello/world", "D2")):
        response = httpx.get(f"{http_url}{path}")
        assert (response.status_code, response.text) == (200, text)
    assert httpx.get(f"{http_url}/not_exist").status_code == 404
    assert httpx.get(f"{http_url}/").status_code == 404


def test_deployment_without_route_is_not_served(http_url: str) -> None:
    @serve.deployment
    class D:
        def __call__(self, *args):
            return "1"

    serve.run(D.bind(), name="routed", route_prefix="/routed")
    serve.run(D.bind(), name="unrouted", route_prefix=None)
    assert httpx.get(f"{http_url}/-/routes").json() == {"/routed": "routed"}
    assert httpx.get(f"{http_url}/").status_code == 404


def test_default_route_is_the_root_of_the_default_app(http_url: str) -> None:
    @serve.deployment
    class D1:
        pass

    serve.run(D1.bind())
    assert httpx.get(f"{http_url}/-/routes").json() == {"/": "default"}


def test_longest_prefix_wins_as_applications_arrive(http_url: str) -> None:
    def check(path: str, text=None, status=None) -> None:
        response = httpx.get(f"{http_url}{path}")
        if text is not None:
            assert response.text == text, (path, response.text)
        if status is not None:
            assert response.status_code == status, (path, response.status_code)

    @serve.deployment
    class D1:
        def __call__(self, *args):
            return "1"

    serve.run(D1.bind(), route_prefix="/hello", name="app1")
    check("/", status=404)
    for path in ("/hello", "/hello/", "/hello/a"):
        check(path, text="1")

    @serve.deployment
    class D2:
        def __call__(self, *args):
            return "2"

    serve.run(D2.bind(), route_prefix="/", name="app2")
    check("/hello/", text="1")
    check("/hello/a", text="1")
    check("/", text="2")
    check("/a", text="2")

    @serve.deployment
    class D3:
        def __call__(self, *args):
            return "3"

    serve.run(D3.bind(), route_prefix="/hello/world", name="app3")
    check("/hello/", text="1")
    check("/", text="2")
    check("/hello/world/", text="3")

    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class D4:
        @app.get("/")
        def root(self):
            return 4

        @app.get("/{p}")
        def subpath(self, p: str):
            return p

    serve.run(D4.bind(), route_prefix="/hello/world/again", name="app4")
    check("/hello/", text="1")
    check("/", text="2")
    check("/hello/world/", text="3")
    check("/hello/world/again/", text="4")
    check("/hello/world/again/hi", text='"hi"')


@pytest.mark.parametrize("base_path", ["", "subpath"])
def test_redirects_stay_under_the_route_prefix(http_url: str, base_path: str) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class D:
        @app.get("/")
        def root(self):
            return "hello from /"

        @app.get("/redirect")
        def redirect_root(self, request: Request):
            root_path = request.scope["root_path"]
            return RedirectResponse(url=root_path if root_path.endswith("/") else root_path + "/")

        @app.get("/redirect2")
        def redirect_twice(self, request: Request):
            root_path = request.scope["root_path"].rstrip("/")
            return RedirectResponse(url=root_path + app.url_path_for("redirect_root"))

    route_prefix = f"/{base_path}"
    serve.run(D.bind(), route_prefix=route_prefix)
    base = http_url + (route_prefix if route_prefix == "/" else route_prefix + "/")
    once = httpx.get(f"{base}redirect", follow_redirects=True)
    assert (once.status_code, len(once.history), once.json()) == (200, 1, "hello from /")
    twice = httpx.get(f"{base}redirect2", follow_redirects=True)
    assert (twice.status_code, len(twice.history), twice.json()) == (200, 2, "hello from /")


def test_default_error_handling(http_url: str) -> None:
    @serve.deployment
    def f():
        _ = 1 / 0

    serve.run(f.bind(), name="f", route_prefix="/f")
    response = httpx.get(f"{http_url}/f")
    assert (response.status_code, response.text) == (500, "Internal Server Error")

    @serve.deployment
    def h():
        os.kill(os.getpid(), signal.SIGKILL)  # the replica dies with the request in it

    serve.run(h.bind(), name="h", route_prefix="/h")
    response = httpx.get(f"{http_url}/h", timeout=30)
    assert response.status_code == 500
    wait_for(lambda: httpx.get(f"{http_url}/f").status_code == 500,
             message="the proxy to keep serving")
