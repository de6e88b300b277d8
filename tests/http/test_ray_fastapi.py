"""Ray Serve's test_fastapi.py, ported by meaning: FastAPI and Starlette apps behind
``@serve.ingress``, given as apps, as builder functions, or without a class.

Covered in test_fastapi_ingress.py already: mounted sub-apps, a plain Starlette
app, two routes sharing a method name, an ingress class with ``__call__``.
Not ported: ``make_fastapi_class_based_view`` (a Ray internal) and the
controller's ``get_docs_path`` (internal; the docs themselves are checked).
Differs on purpose (docs/behaviour.md, "HTTP"): a route added to the app after
``@serve.ingress`` is served (Ray copies the app at decoration and ignores it).
No ``from __future__ import annotations``: see test_ray_http_routes.py.
"""

import os
import tempfile
from pathlib import Path
from typing import Any, List, Optional

import httpx
import pytest
from fastapi import (APIRouter, BackgroundTasks, Cookie, Depends, FastAPI, Header, Query,
                     Request, Response)
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ladle import serve
from ladle.exceptions import RayServeException
from ladle.serve.handle import DeploymentHandle
from tests.conftest import wait_for

# Ray's tests use FastAPI's deprecated on_event hooks, which users still write.
pytestmark = pytest.mark.filterwarnings(r"ignore:\s*on_event is deprecated:DeprecationWarning")


def test_route_outside_the_class_with_validation(http_url: str) -> None:
    app = FastAPI()

    @app.get("/{a}")
    def func(a: int):
        return {"result": a}

    @serve.deployment
    @serve.ingress(app)
    class FastAPIApp:
        pass

    serve.run(FastAPIApp.bind(), route_prefix="/api")
    assert httpx.get(f"{http_url}/api/100").json() == {"result": 100}
    bad = httpx.get(f"{http_url}/api/not-number")
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["type"] == "int_parsing"


def test_class_based_view_over_http_and_handles(http_url: str) -> None:
    app = FastAPI()

    @app.get("/other")
    def hello():
        return "hello"

    @serve.deployment
    @serve.ingress(app)
    class A:
        def __init__(self):
            self.val = 1

        @app.get("/calc/{i}")
        def b(self, i: int):
            return i + self.val

        @app.post("/calc/{i}")
        def c(self, i: int):
            return i - self.val

        def other(self, msg: str):
            return msg

    serve.run(A.bind())
    assert httpx.get(f"{http_url}/calc/41").json() == 42
    assert httpx.post(f"{http_url}/calc/41").json() == 40
    assert httpx.get(f"{http_url}/other").json() == "hello"
    handle = serve.get_app_handle("default")
    assert handle.b.remote(41).result() == 42
    assert handle.c.remote(41).result() == 40
    assert handle.other.remote("world").result() == "world"


class Nested(BaseModel):
    val: int


class BodyType(BaseModel):
    name: str
    price: float = Field(None, gt=1.0, description="High price!")
    nests: Nested


class RespModel(BaseModel):
    ok: bool
    vals: List[Any]
    file_path: str


def test_fastapi_features(http_url: str) -> None:
    app = FastAPI(openapi_url="/my_api.json")

    @app.on_event("startup")
    def inject_state():
        app.state.state_one = "app.state"

    @app.middleware("http")
    async def add_process_time_header(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Process-Time"] = "0.001"
        return response

    async def yield_db():
        yield "db"

    async def common_parameters(q: Optional[str] = None):
        return {"q": q}

    @app.exception_handler(ValueError)
    async def custom_handler(_: Request, exc: ValueError):
        return JSONResponse(status_code=500, content={"custom_error": "true",
                                                      "message": str(exc)})

    def run_background(background_tasks: BackgroundTasks):
        _, path = tempfile.mkstemp()

        def write_to_file(p):
            with open(p, "w") as f:
                f.write("hello")

        background_tasks.add_task(write_to_file, path)
        return path

    app.add_middleware(CORSMiddleware, allow_origins="*")

    @app.get("/{path_arg}", response_model=RespModel, status_code=201)
    async def func(path_arg: str, query_arg: str, body_val: BodyType,
                   backgrounds_tasks: BackgroundTasks, do_error: bool = False,
                   query_arg_valid: Optional[str] = Query(None, min_length=3),
                   cookie_arg: Optional[str] = Cookie(None),
                   user_agent: Optional[str] = Header(None),
                   commons: dict = Depends(common_parameters), db=Depends(yield_db)):
        if do_error:
            raise ValueError("bad input")
        path = run_background(backgrounds_tasks)
        return RespModel(ok=True, vals=[
            path_arg, query_arg, body_val.price, body_val.nests.val, do_error,
            query_arg_valid, cookie_arg, user_agent.split("/")[0], commons, db,
            app.state.state_one], file_path=path)

    router = APIRouter(prefix="/prefix")

    @router.get("/subpath")
    def router_path():
        return "ok"

    app.include_router(router)

    @serve.deployment
    @serve.ingress(app)
    class Worker:
        pass

    serve.run(Worker.bind(), route_prefix="/fastapi")
    url = f"{http_url}/fastapi"
    missing = httpx.get(f"{url}/")
    assert missing.status_code == 404
    assert "x-process-time" in missing.headers
    schema = httpx.get(f"{url}/my_api.json")
    assert schema.status_code == 200 and schema.json()
    for page in ("docs", "redoc"):
        response = httpx.get(f"{url}/{page}")
        assert response.status_code == 200 and "<!DOCTYPE html>" in response.text
    assert httpx.get(f"{url}/path_arg").status_code == 422

    body = {"name": "serve", "price": 12, "nests": {"val": 1}}
    params = {"query_arg": "query_arg", "query_arg_valid": "at-least-three-chars",
              "q": "common_arg"}
    response = httpx.request("GET", f"{url}/path_arg", json=body, params=params)
    assert response.status_code == 201, response.text
    assert response.json()["ok"]
    assert response.json()["vals"] == [
        "path_arg", "query_arg", 12.0, 1, False, "at-least-three-chars", None,
        "python-httpx", {"q": "common_arg"}, "db", "app.state"]
    # The background task ran after the response (in the replica, on this machine).
    written = Path(response.json()["file_path"])
    wait_for(lambda: written.read_text() == "hello", message="the background task")
    written.unlink()

    failed = httpx.request("GET", f"{url}/path_arg", json=body,
                           params={**params, "do_error": "true"})
    assert failed.status_code == 500
    assert failed.json()["custom_error"] == "true"
    assert httpx.get(f"{url}/prefix/subpath").status_code == 200
    cors = httpx.get(f"{url}/docs", headers={"Access-Control-Request-Method": "GET",
                                            "Origin": "https://googlebot.com"})
    assert cors.headers["access-control-allow-origin"] == "*", cors.headers


def test_a_failing_shutdown_hook_does_not_stop_startup() -> None:
    app = FastAPI()

    @app.on_event("shutdown")
    async def shutdown():
        _ = 1 / 0

    @serve.deployment
    @serve.ingress(app)
    class A:
        def f(self):
            return 1

    handle = serve.run(A.bind())
    assert handle.f.remote().result() == 1


def test_two_classes_on_one_app_keep_their_own_routes(http_url: str) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class App1:
        @app.get("/")
        def func_v1(self):
            return "first"

    @serve.deployment
    @serve.ingress(app)
    class App2:
        @app.get("/")
        def func_v2(self):
            return "second"

    serve.run(App1.bind(), name="app1", route_prefix="/api/v1")
    serve.run(App2.bind(), name="app2", route_prefix="/api/v2")
    assert httpx.get(f"{http_url}/api/v1", follow_redirects=True).json() == "first"
    assert httpx.get(f"{http_url}/api/v2", follow_redirects=True).json() == "second"


def test_same_app_in_two_deployments_serves_each_its_routes(http_url: str) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class CounterDeployment1:
        @app.get("/incr")
        def incr(self):
            return "incr"

        @app.get("/decr")
        def decr(self):
            return "decr"

    @serve.deployment
    @serve.ingress(app)
    class CounterDeployment2:
        @app.get("/incr2")
        def incr2(self):
            return "incr2"

        @app.get("/decr2")
        def decr2(self):
            return "decr2"

    serve.run(CounterDeployment1.bind(), name="app1", route_prefix="/app1")
    serve.run(CounterDeployment2.bind(), name="app2", route_prefix="/app2")
    for prefix, path in (("/app1", "/incr"), ("/app1", "/decr"), ("/app2", "/incr2"),
                         ("/app2", "/decr2")):
        assert httpx.get(f"{http_url}{prefix}{path}").json() == path[1:]
    for prefix, path in (("/app1", "/incr2"), ("/app1", "/decr2"), ("/app2", "/incr"),
                         ("/app2", "/decr")):
        assert httpx.get(f"{http_url}{prefix}{path}").status_code == 404


@pytest.mark.parametrize(("route_prefix", "base"), [("/", ""), ("/subpath", "/subpath")])
def test_docs_follow_a_redeploy(http_url: str, route_prefix: str, base: str) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class App:
        @app.get("/")
        def func1(self, arg: str):
            return "hello"

    serve.run(App.bind(), route_prefix=route_prefix)
    paths = httpx.get(f"{http_url}{base}/openapi.json").json()["paths"]
    assert {path: list(ops) for path, ops in paths.items()} == {"/": ["get"]}
    assert httpx.get(f"{http_url}{base}/docs").status_code == 200

    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class App:  # noqa: F811 - the new version of the same deployment
        @app.get("/")
        def func1(self, arg: str):
            return "hello"

        @app.post("/hello")
        def func2(self, arg: int):
            return "hello"

    serve.run(App.bind(), route_prefix=route_prefix)
    paths = httpx.get(f"{http_url}{base}/openapi.json").json()["paths"]
    assert {path: list(ops) for path, ops in paths.items()} == {"/": ["get"],
                                                               "/hello": ["post"]}
    assert httpx.get(f"{http_url}{base}/docs").status_code == 200


def test_several_set_cookie_headers(http_url: str) -> None:
    app = FastAPI()

    @app.get("/")
    def func(resp: Response):
        resp.set_cookie(key="a", value="b")
        resp.set_cookie(key="c", value="d")
        return "hello"

    @serve.deployment
    @serve.ingress(app)
    class FastAPIApp:
        pass

    serve.run(FastAPIApp.bind())
    assert dict(httpx.get(http_url).cookies) == {"a": "b", "c": "d"}


class TwoFields(BaseModel):
    a: str
    b: List[str]


def test_nested_fields_in_response_models(http_url: str) -> None:
    app = FastAPI()

    @app.get("/", response_model=TwoFields)
    def test_endpoint():
        return TwoFields(a="a", b=["b"])

    @serve.deployment
    @serve.ingress(app)
    class TestDeployment:
        @app.get("/inner", response_model=TwoFields)
        def test_endpoint_2(self):
            return TwoFields(a="a", b=["b"])

        @app.get("/inner2", response_model=List[TwoFields])
        def test_endpoint_3(self):
            return [TwoFields(a="a", b=["b"])]

    serve.run(TestDeployment.bind())
    assert httpx.get(http_url).json() == {"a": "a", "b": ["b"]}
    assert httpx.get(f"{http_url}/inner").json() == {"a": "a", "b": ["b"]}
    assert httpx.get(f"{http_url}/inner2").json() == [{"a": "a", "b": ["b"]}]


def test_constructor_runs_before_startup_hooks(http_url: str, tmp_path) -> None:
    marker = str(tmp_path / "started")
    app = FastAPI()

    @app.on_event("startup")
    def startup_event():
        open(marker, "w").close()

    @serve.deployment
    @serve.ingress(app)
    class TestDeployment:
        def __init__(self):
            self.hook_ran_first = os.path.exists(marker)

        @app.get("/")
        def root(self):
            return {"hook_ran_first": self.hook_ran_first, "hook_ran": os.path.exists(marker)}

    serve.run(TestDeployment.bind())
    assert httpx.get(http_url).json() == {"hook_ran_first": False, "hook_ran": True}


def test_shutdown_hook_runs_on_delete(tmp_path) -> None:
    marker = str(tmp_path / "shut down")
    app = FastAPI()

    @app.on_event("shutdown")
    def call_signal():
        open(marker, "w").close()

    @serve.deployment
    @serve.ingress(app)
    class A:
        pass

    serve.run(A.bind())
    assert not os.path.exists(marker)
    serve.delete("default")
    wait_for(lambda: os.path.exists(marker), message="the shutdown hook")


@pytest.mark.parametrize("two_fastapi", [True, False])
@pytest.mark.parametrize("docs_url", ["/docs", None])
def test_two_ingress_deployments_in_one_application(two_fastapi: bool, docs_url) -> None:
    app1 = FastAPI(docs_url=docs_url)
    app2 = FastAPI(docs_url=docs_url)

    class SubModel:
        def add(self, a: int):
            return a + 1

    @serve.deployment
    @serve.ingress(app1)
    class Model:
        def __init__(self, submodel: DeploymentHandle):
            self.submodel = submodel

        @app1.get("/{a}")
        async def func(self, a: int):
            return await self.submodel.add.remote(a)

    if two_fastapi:
        sub = serve.deployment(serve.ingress(app2)(SubModel))
        with pytest.raises(RayServeException, match="FastAPI"):
            serve.run(Model.bind(sub.bind()), name="app1")
    else:
        handle = serve.run(Model.bind(serve.deployment(SubModel).bind()), name="app1")
        assert handle.func.remote(5).result() == 6


# -------------------------------------------- apps from builders, or without a class


def fastapi_builder():
    app = FastAPI(docs_url="/custom-docs")

    @app.get("/")
    def f1():
        return "hello"

    router = APIRouter()

    @router.get("/f2")
    def f2():
        return "hello f2"

    @router.get("/error")
    def error():
        raise ValueError("some error")

    app.include_router(router)

    @app.middleware("http")
    async def add_header(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Custom-Middleware"] = "fake-middleware"
        return response

    @app.exception_handler(ValueError)
    async def custom_exception_handler(request: Request, exc: ValueError):
        return JSONResponse(status_code=500, content={"error": "fake-error"})

    return app


def starlette_builder():
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse
    from starlette.routing import Route, Router

    async def homepage(request):
        return JSONResponse("hello")

    async def f2(request):
        return JSONResponse("hello f2")

    async def error(request):
        raise ValueError("some error")

    class CustomHeaderMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):
            response = await call_next(request)
            response.headers["X-Custom-Middleware"] = "fake-middleware"
            return response

    def handle_value_error(request, exc):
        return JSONResponse(status_code=500, content={"error": "fake-error"})

    app = Starlette(routes=[Route("/", homepage)],
                    middleware=[Middleware(CustomHeaderMiddleware)],
                    exception_handlers={ValueError: handle_value_error})
    app.mount("/", Router([Route("/f2", f2), Route("/error", error)]))
    return app


def assert_builder_app(url: str, docs: bool, middleware: bool = True) -> None:
    root = httpx.get(url)
    assert root.json() == "hello"
    f2 = httpx.get(f"{url}/f2")
    assert f2.json() == "hello f2"
    if middleware:
        assert root.headers["X-Custom-Middleware"] == "fake-middleware"
        assert f2.headers["X-Custom-Middleware"] == "fake-middleware"
    error = httpx.get(f"{url}/error")
    assert (error.status_code, error.json()) == (500, {"error": "fake-error"})
    assert httpx.get(f"{url}/custom-docs").status_code == (200 if docs else 404)


def test_app_with_routes_outside_and_inside_the_class(http_url: str) -> None:
    app = fastapi_builder()

    @serve.deployment
    @serve.ingress(app)
    class ASGIIngress:
        @app.get("/class_route")
        def class_route(self):
            return "hello class route"

    serve.run(ASGIIngress.bind())
    assert_builder_app(http_url, docs=True)
    assert httpx.get(f"{http_url}/class_route").json() == "hello class route"


@pytest.mark.parametrize("builder", [fastapi_builder, starlette_builder])
@pytest.mark.parametrize("how", ["app without a class", "builder without a class",
                                 "builder on a class"])
def test_builders_and_apps_without_a_class(http_url: str, builder, how: str) -> None:
    if how == "app without a class":
        deployment = serve.deployment(serve.ingress(builder())())
        assert deployment.name == "ASGIIngressDeployment"
    elif how == "builder without a class":
        deployment = serve.deployment(serve.ingress(builder)())
    else:
        @serve.deployment
        @serve.ingress(builder)
        class ASGIIngress:
            def __init__(self):
                pass

        deployment = ASGIIngress
    serve.run(deployment.bind())
    assert_builder_app(http_url, docs=builder is fastapi_builder)


def test_ingress_class_may_not_be_callable() -> None:
    app = fastapi_builder()

    class ASGIIngress:
        def __call__(self):
            pass

    with pytest.raises(ValueError, match="__call__"):
        serve.ingress(app)(ASGIIngress)

    class Inherits(ASGIIngress):
        pass

    with pytest.raises(ValueError, match="__call__"):
        serve.ingress(app)(Inherits)


def sub_deployment():
    @serve.deployment
    class SubModel:
        def __call__(self, a: int):
            return a + 1

    return SubModel.options(name="sub_deployment")


def fastapi_builder_with_sub_deployment():
    app = fastapi_builder()

    def get_sub_deployment_handle():
        return serve.get_deployment_handle(sub_deployment().name, "default")

    class Data(BaseModel):
        a: int

    @app.get("/sub_deployment", response_model=Data)
    async def f(request: Request,
                handle: DeploymentHandle = Depends(get_sub_deployment_handle)):
        a = int(request.query_params.get("a", 1))
        return Data(a=await handle.remote(a))

    return app


@pytest.mark.parametrize("with_class", [True, False])
def test_builder_app_calls_another_deployment(http_url: str, with_class: bool) -> None:
    if with_class:
        @serve.deployment
        @serve.ingress(fastapi_builder_with_sub_deployment)
        class ASGIIngress:
            def __init__(self, sub_deployment: DeploymentHandle):
                self.sub_deployment = sub_deployment

        deployment = ASGIIngress
    else:
        # The class serve.ingress makes takes any constructor arguments.
        deployment = serve.deployment(serve.ingress(fastapi_builder_with_sub_deployment)())
    serve.run(deployment.bind(sub_deployment().bind()))
    assert httpx.get(f"{http_url}/sub_deployment?a=2").json() == {"a": 3}


def test_serve_build_asgi_app_method(http_url: str) -> None:
    class Late:
        def __init__(self, greeting: str):
            self.greeting = greeting

        async def __serve_build_asgi_app__(self):
            app = FastAPI()

            @app.get("/")
            def root():
                return self.greeting

            return app

    serve.run(serve.deployment(serve.ingress()(Late)).bind("built late"))
    assert httpx.get(http_url).json() == "built late"
    with pytest.raises(ValueError, match="__serve_build_asgi_app__"):
        serve.ingress()(type("NoBuilder", (), {}))
