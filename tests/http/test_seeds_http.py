"""The HTTP examples of the seeds (/work/shared/seeds/), run word for word.

From ``http-and-python-calls.rst`` and ``serve-handle-explainer.md``; only the
imports differ (``from ladle import serve``, ``import ladle as ray``), and a
``.deploy()`` is added where the page shows a deployment without deploying
it.  Like the docs, these use the default HTTP address, ``localhost:8000``
(no ``serve.start`` options): port 8000 must be free.

Where the docs' comments promise an output, the test checks it.  One comment
is wrong as written: ``print(requests.get(...))`` prints ``<Response [200]>``,
not the body (``Hello Alice!`` is the response's ``.text``).
"""

# No `from __future__ import annotations`: FastAPI reads the examples' annotations.

import socket

import pytest
import requests

import ladle as ray
from ladle import serve


@pytest.fixture(autouse=True)
def port_8000_is_free() -> None:
    """The seeds talk to http://localhost:8000: fail clearly if something else holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError as exc:
            pytest.fail(f"port 8000 of 127.0.0.1 is in use ({exc.strerror}): these seed "
                        "examples call http://localhost:8000 and need it free")


# ------------------------------------------------- serve-handle-explainer.md


def test_explainer_same_logic_from_http_and_python(capsys) -> None:
    @serve.deployment(route_prefix="/api")
    class Deployment:
        def say_hello(self, name: str):
            return f"Hello {name}!"

        def __call__(self, request):
            return self.say_hello(request.query_params["name"])

    Deployment.deploy()

    print(requests.get("http://localhost:8000/api?name=Alice"))
    # Hello Alice!

    handle = Deployment.get_handle()
    print(ray.get(handle.say_hello.remote("Alice")))
    # Hello Alice!

    assert capsys.readouterr().out == "<Response [200]>\nHello Alice!\n"
    response = requests.get("http://localhost:8000/api?name=Alice")
    assert (response.status_code, response.text) == (200, "Hello Alice!")
    assert response.headers["content-type"].startswith("text/plain")
    assert requests.get("http://localhost:8000/api?name=Bob").text == "Hello Bob!"
    # A missing query parameter is the user's KeyError: 500, no traceback leaked.
    failed = requests.get("http://localhost:8000/api")
    assert (failed.status_code, failed.text) == (500, "Internal Server Error")


def test_explainer_default_route_is_the_deployment_name() -> None:
    # `Deployment.deploy()` without a route_prefix: exposed at /{deployment name}.
    @serve.deployment
    class Deployment:
        def method1(self, arg):
            return f"Method1: {arg}"

        def __call__(self, arg):
            return f"__call__: {arg}"

    Deployment.deploy()

    handle = Deployment.get_handle()
    assert ray.get(handle.remote("hi")) == "__call__: hi"
    # Over HTTP, `arg` is the Starlette Request.
    response = requests.get("http://localhost:8000/Deployment")
    assert response.status_code == 200
    assert response.text.startswith("__call__: <starlette.requests.Request object")
    assert requests.get("http://localhost:8000/Deployment/sub/path").status_code == 200
    assert requests.get("http://localhost:8000/").status_code == 404
    assert requests.get("http://localhost:8000/-/routes").json() == {
        "/Deployment": "Deployment"}


# ---------------------------------------------------- http-and-python-calls.rst


def test_basic_example_counter_route() -> None:
    @serve.deployment(route_prefix="/counter")
    class Counter:
        def __call__(self, request):
            pass

    Counter.deploy()

    response = requests.get("http://localhost:8000/counter")
    assert response.status_code == 200
    assert response.content == b""  # `pass` returns None: an empty body, as Ray Serve sends


def test_fastapi_deployment_and_its_second_version() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @serve.deployment(route_prefix="/hello")
    @serve.ingress(app)
    class MyFastAPIDeployment:
        @app.get("/")
        def root(self):
            return "Hello, world!"

    MyFastAPIDeployment.deploy()

    # "Now if you send a request to /hello, this will be routed to the root method"
    assert requests.get("http://localhost:8000/hello").json() == "Hello, world!"
    assert requests.get("http://localhost:8000/hello/").json() == "Hello, world!"

    from fastapi import FastAPI

    app = FastAPI()

    @serve.deployment(route_prefix="/hello")
    @serve.ingress(app)
    class MyFastAPIDeployment:
        @app.get("/")
        def root(self):
            return "Hello, world!"

        @app.post("/{subpath}")
        def root(self, subpath: str):
            return f"Hello from {subpath}!"

    MyFastAPIDeployment.deploy()  # replaces the first version in place

    assert requests.get("http://localhost:8000/hello/").json() == "Hello, world!"
    assert requests.post("http://localhost:8000/hello/there").json() == "Hello from there!"
    assert requests.get("http://localhost:8000/hello/there").status_code == 405
    assert list(requests.get("http://localhost:8000/-/routes").json()) == ["/hello"]


def test_existing_fastapi_app_served_as_is() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def f():
        return "Hello from the root!"

    # ... add more routes, routers, etc. to `app` ...

    @serve.deployment(route_prefix="/")
    @serve.ingress(app)
    class FastAPIWrapper:
        pass

    FastAPIWrapper.deploy()

    assert requests.get("http://localhost:8000/").json() == "Hello from the root!"
    assert requests.get("http://localhost:8000/docs").status_code == 200
    assert list(requests.get("http://localhost:8000/openapi.json").json()["paths"]) == ["/"]


def test_routes_of_the_app_and_of_the_deployments_combine() -> None:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    def f():
        return "Hello from the root!"

    @serve.deployment(route_prefix="/api1")
    @serve.ingress(app)
    class FastAPIWrapper1:
        @app.get("/subpath")
        def method(self):
            return "Hello 1!"

    @serve.deployment(route_prefix="/api2")
    @serve.ingress(app)
    class FastAPIWrapper2:
        @app.get("/subpath")
        def method(self):
            return "Hello 2!"

    FastAPIWrapper1.deploy()
    FastAPIWrapper2.deploy()

    # "requests to both /api1 and /api2 would return Hello from the root! while a
    # request to /api1/subpath would return Hello 1! and a request to
    # /api2/subpath would return Hello 2!"
    assert requests.get("http://localhost:8000/api1").json() == "Hello from the root!"
    assert requests.get("http://localhost:8000/api2").json() == "Hello from the root!"
    assert requests.get("http://localhost:8000/api1/subpath").json() == "Hello 1!"
    assert requests.get("http://localhost:8000/api2/subpath").json() == "Hello 2!"


def test_cors_middleware_on_the_default_port() -> None:
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    client = serve.start(
        http_options={"middlewares": [
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
        ]})

    assert client is None  # ladle's serve.start returns nothing (Ray's returned a client)

    @serve.deployment(route_prefix="/counter")
    class Counter:
        def __call__(self, request):
            return {"count": 1}

    Counter.deploy()

    origin = {"Origin": "http://example.com"}
    preflight = requests.options("http://localhost:8000/counter",
                                 headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    simple = requests.get("http://localhost:8000/counter", headers=origin)
    assert simple.json() == {"count": 1}
    assert simple.headers["access-control-allow-origin"] == "*"
