"""``@serve.ingress``: FastAPI and Starlette apps served by replicas, through the real proxy.

Class methods become routes with ``self`` bound to the replica's instance;
an app's own routes, routers, mounts, dependencies, middlewares, exception
handlers, lifespan, OpenAPI docs and WebSockets work as under plain uvicorn,
below the application's route prefix.

No ``from __future__ import annotations`` here: FastAPI reads the route
signatures' annotations at decoration time, and string annotations naming
classes local to a test function could not be resolved.
"""

import os
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from ladle import serve
from ladle.exceptions import DeploymentFailedError
from ladle.serve.handle import DeploymentHandle
from tests.conftest import wait_for

# ---------------------------------------------------------------- class routes
# Module level: the class and its app reach the replica by reference (the
# replica imports this module); the tests further down define theirs inside
# the test function, which ships them by value.

store_app = FastAPI(title="Store")


class Item(BaseModel):
    name: str
    price: float = Field(gt=0)


def current_user(x_user: str = Header(default="anonymous")) -> str:
    return x_user.lower()


@serve.deployment
@serve.ingress(store_app)
class Store:
    def __init__(self, owner: str) -> None:
        # Startup state: built once per replica, held on `self`, seen by every route.
        self.owner = owner
        self.items: dict[int, Item] = {}
        self.pid = os.getpid()

    @store_app.get("/info")
    def info(self) -> dict:
        return {"owner": self.owner, "count": len(self.items), "pid": self.pid}

    @store_app.get("/items/{item_id}")
    def read(self, item_id: int, verbose: bool = False) -> dict:
        if item_id not in self.items:
            raise HTTPException(status_code=404, detail=f"no item {item_id}")
        item = self.items[item_id]
        return {"item": item.model_dump(), **({"owner": self.owner} if verbose else {})}

    @store_app.post("/items/{item_id}", status_code=201)
    def create(self, item_id: int, item: Item) -> dict:
        self.items[item_id] = item
        return {"created": item_id, "item": item.model_dump()}

    @store_app.put("/items/{item_id}")
    async def replace(self, item_id: int, item: Item) -> dict:
        old = self.items.get(item_id)
        self.items[item_id] = item
        return {"old": old.model_dump() if old else None, "new": item.model_dump()}

    @store_app.delete("/items/{item_id}")
    def remove(self, item_id: int) -> dict:
        return {"deleted": self.items.pop(item_id).model_dump()}

    @store_app.get("/whoami")
    def whoami(self, user: str = Depends(current_user)) -> str:
        return f"{user} at {self.owner}"


def test_class_methods_are_routes_with_self_and_validation(http_url: str) -> None:
    serve.run(Store.bind("alice"), route_prefix="/store")
    with httpx.Client(base_url=f"{http_url}/store") as client:
        info = client.get("/info")
        assert info.status_code == 200
        assert info.json() == {"owner": "alice", "count": 0, "pid": info.json()["pid"]}
        assert info.json()["pid"] != os.getpid()  # answered by the replica process

        # Path + body (pydantic model) parameters; several methods; state kept on self.
        created = client.post("/items/1", json={"name": "apple", "price": 1.5})
        assert (created.status_code, created.json()) == (
            201, {"created": 1, "item": {"name": "apple", "price": 1.5}})
        got = client.get("/items/1", params={"verbose": "true"})
        assert got.json() == {"item": {"name": "apple", "price": 1.5}, "owner": "alice"}
        assert client.get("/items/1").json() == {"item": {"name": "apple", "price": 1.5}}
        replaced = client.put("/items/1", json={"name": "pear", "price": 2})
        assert replaced.json() == {"old": {"name": "apple", "price": 1.5},
                                   "new": {"name": "pear", "price": 2.0}}
        assert client.get("/info").json()["count"] == 1
        assert client.delete("/items/1").json() == {"deleted": {"name": "pear", "price": 2.0}}
        missing = client.get("/items/1")
        assert (missing.status_code, missing.json()) == (404, {"detail": "no item 1"})

        # Validation errors: 422 with FastAPI's detail, naming the bad field.
        bad_path = client.get("/items/abc")
        assert bad_path.status_code == 422
        assert bad_path.json()["detail"][0]["loc"] == ["path", "item_id"]
        bad_query = client.get("/items/1", params={"verbose": "maybe"})
        assert bad_query.status_code == 422
        assert bad_query.json()["detail"][0]["loc"] == ["query", "verbose"]
        no_field = client.post("/items/2", json={"name": "fig"})
        assert no_field.status_code == 422
        assert no_field.json()["detail"][0]["loc"] == ["body", "price"]
        bad_value = client.put("/items/2", json={"name": "fig", "price": -1})
        assert bad_value.status_code == 422
        assert bad_value.json()["detail"][0]["type"] == "greater_than"
        not_json = client.post("/items/2", content=b"{nope",
                               headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert client.get("/info").json()["count"] == 0  # nothing invalid got stored

        # A method the route doesn't have: 405 from FastAPI, not the proxy.
        assert client.patch("/items/1").status_code == 405
        assert client.get("/nope").status_code == 404

        # Dependency injection into a class method.
        assert client.get("/whoami", headers={"x-user": "BOB"}).json() == "bob at alice"
        assert client.get("/whoami").json() == "anonymous at alice"


def test_docs_and_openapi_under_the_route_prefix(http_url: str) -> None:
    serve.run(Store.bind("carol"), route_prefix="/store")
    with httpx.Client(base_url=http_url) as client:
        schema = client.get("/store/openapi.json")
        assert schema.status_code == 200
        spec = schema.json()
        assert spec["info"]["title"] == "Store"
        assert set(spec["paths"]) == {"/info", "/items/{item_id}", "/whoami"}
        assert set(spec["paths"]["/items/{item_id}"]) == {"get", "post", "put", "delete"}
        # `self` is bound, never a parameter of the API.
        for path, operations in spec["paths"].items():
            for operation in operations.values():
                names = [p["name"] for p in operation.get("parameters", [])]
                assert "self" not in names, (path, names)
        get_params = spec["paths"]["/items/{item_id}"]["get"]["parameters"]
        assert [(p["name"], p["in"]) for p in get_params] == [("item_id", "path"),
                                                              ("verbose", "query")]
        post_body = spec["paths"]["/items/{item_id}"]["post"]["requestBody"]
        assert post_body["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Item"}
        # FastAPI advertises where it is mounted.
        assert spec.get("servers") == [{"url": "/store"}]

        docs = client.get("/store/docs")
        assert docs.status_code == 200
        assert docs.headers["content-type"].startswith("text/html")
        assert "'/store/openapi.json'" in docs.text or '"/store/openapi.json"' in docs.text
        assert client.get("/openapi.json").status_code == 404  # nothing outside the prefix


# --------------------------------------------------------- an app served as is


def test_existing_app_wrapped_as_is_with_its_own_features(http_url: str) -> None:
    app = FastAPI()

    @app.get("/")
    def f():
        return "Hello from the root!"

    users = APIRouter()

    @users.get("/{name}")
    def user(name: str, limit: int = 10):
        return {"user": name, "limit": limit}

    app.include_router(users, prefix="/users", tags=["users"])

    sub = FastAPI()

    @sub.get("/ping")
    def ping(request: Request):
        return {"pong": True, "root_path": request.scope["root_path"]}

    app.mount("/sub", sub)

    def token(x_token: str = Header()) -> str:
        if x_token != "secret":
            raise HTTPException(status_code=401, detail="bad token")
        return x_token

    @app.get("/secure")
    def secure(value: str = Depends(token)):
        return {"token": value}

    class Teapot(Exception):
        pass

    @app.exception_handler(Teapot)
    async def on_teapot(request: Request, exc: Teapot):
        return JSONResponse({"teapot": str(exc)}, status_code=418)

    @app.get("/brew")
    def brew():
        raise Teapot("short and stout")

    @app.middleware("http")
    async def stamp(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-stamped"] = request.url.path
        return response

    @serve.deployment
    @serve.ingress(app)
    class Wrapper:
        pass

    serve.run(Wrapper.bind(), route_prefix="/w")
    with httpx.Client(base_url=f"{http_url}/w") as client:
        root = client.get("/")
        assert (root.status_code, root.json()) == (200, "Hello from the root!")
        assert root.headers["x-stamped"] == "/w/"  # the app's middleware ran, full path
        assert client.get("/users/ann", params={"limit": 3}).json() == {"user": "ann",
                                                                       "limit": 3}
        assert client.get("/users/ann", params={"limit": "x"}).status_code == 422
        mounted = client.get("/sub/ping")
        assert (mounted.status_code, mounted.json()) == (200, {"pong": True,
                                                               "root_path": "/w/sub"})
        assert client.get("/secure", headers={"x-token": "secret"}).json() == {
            "token": "secret"}
        denied = client.get("/secure", headers={"x-token": "guess"})
        assert (denied.status_code, denied.json()) == (401, {"detail": "bad token"})
        assert client.get("/secure").status_code == 422  # the header is required
        brewed = client.get("/brew")
        assert (brewed.status_code, brewed.json()) == (418, {"teapot": "short and stout"})
        assert brewed.headers["x-stamped"] == "/w/brew"
        assert set(client.get("/openapi.json").json()["paths"]) == {"/", "/users/{name}",
                                                                   "/secure", "/brew"}


def test_app_lifespan_runs_on_each_replica(http_url: str, tmp_path) -> None:
    # Under uvicorn an app's lifespan (startup/shutdown) runs around its serving.
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.model = f"model loaded in {os.getpid()}"
        yield {"session": "open"}
        (tmp_path / f"shutdown-{os.getpid()}").write_text("done")

    app = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(app)
    class Model:
        def __init__(self) -> None:
            self.pid = os.getpid()

        @app.get("/")
        def predict(self, request: Request):
            return {"model": getattr(request.app.state, "model", None),
                    "session": request.state.session if hasattr(request.state, "session")
                    else None,
                    "pid": self.pid}

    serve.run(Model.bind(), route_prefix="/m")
    answer = httpx.get(f"{http_url}/m/").json()
    assert answer == {"model": f"model loaded in {answer['pid']}", "session": "open",
                      "pid": answer["pid"]}
    assert not list(tmp_path.iterdir())
    serve.delete("default")
    wait_for(lambda: (tmp_path / f"shutdown-{answer['pid']}").exists(),
             message="the lifespan's shutdown to run")


def test_app_lifespan_startup_failure_fails_the_deployment(http_url: str) -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        raise RuntimeError("no weights")
        yield

    app = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(app)
    class Broken:
        @app.get("/")
        def root(self):
            return "unreachable"

    with pytest.raises(DeploymentFailedError, match="lifespan startup failed"):
        serve.run(Broken.bind(), route_prefix="/broken")


# ------------------------------------------- one app, routes from app and class


def test_seed_two_deployments_sharing_one_app(http_url: str) -> None:
    # http-and-python-calls.rst, "combine routes defined this way with routes
    # defined on the deployment"; both as applications of their own.
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

    serve.run(FastAPIWrapper1.bind(), name="api1")
    serve.run(FastAPIWrapper2.bind(), name="api2")
    # `/api1` is the app's "" path: Starlette redirects it to "/api1/" (as under Ray
    # Serve, whose docs use `requests`, which follows redirects).
    with httpx.Client(base_url=http_url, follow_redirects=True) as client:
        for url, text in [("/api1", "Hello from the root!"), ("/api2", "Hello from the root!"),
                          ("/api1/", "Hello from the root!"), ("/api1/subpath", "Hello 1!"),
                          ("/api2/subpath", "Hello 2!")]:
            response = client.get(url)
            assert (response.status_code, response.json()) == (200, text), url
        assert str(client.get("/api2").url) == f"{http_url}/api2/"
        # Each application's docs list its own class's routes only once.
        for prefix in ("/api1", "/api2"):
            spec = client.get(f"{prefix}/openapi.json").json()
            assert list(spec["paths"]) == ["/", "/subpath"]
            assert len(spec["paths"]["/subpath"]) == 1


def test_class_methods_with_the_same_name_are_distinct_routes(http_url: str) -> None:
    # FastAPI allows it (the seed's MyFastAPIDeployment does it): each route
    # keeps its own function, bound to the instance, though the class attribute
    # only holds the last one.
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Twice:
        def __init__(self) -> None:
            self.greeting = "Hello"

        @app.get("/")
        def root(self):
            return f"{self.greeting}, world!"

        @app.post("/{subpath}")
        def root(self, subpath: str):  # noqa: F811 - the seed's very example
            return f"{self.greeting} from {subpath}!"

    serve.run(Twice.bind(), route_prefix="/twice")
    with httpx.Client(base_url=f"{http_url}/twice") as client:
        assert client.get("/").json() == "Hello, world!"
        assert client.post("/there").json() == "Hello from there!"


# ------------------------------------------------------------------ WebSockets


def test_websocket_echo_and_server_close(http_url: str) -> None:
    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Chat:
        def __init__(self) -> None:
            self.prefix = "echo: "

        @app.websocket("/echo")
        async def echo(self, ws: WebSocket) -> None:
            await ws.accept()
            while True:
                text = await ws.receive_text()
                if text == "bye":
                    await ws.close(code=1000)
                    return
                await ws.send_text(self.prefix + text)

        @app.websocket("/countdown/{n}")
        async def countdown(self, ws: WebSocket, n: int) -> None:
            await ws.accept()
            for i in range(n, 0, -1):
                await ws.send_json({"left": i})
            await ws.close(code=4000, reason="liftoff")

        @app.get("/")
        def plain(self):
            return "http still works"

    serve.run(Chat.bind(), route_prefix="/chat")
    ws_url = http_url.replace("http://", "ws://") + "/chat"

    with connect(f"{ws_url}/echo", open_timeout=10) as ws:
        for i in range(5):
            ws.send(f"message {i}")
            assert ws.recv(timeout=10) == f"echo: message {i}"
        ws.send("bye")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000

    with connect(f"{ws_url}/countdown/3", open_timeout=10) as ws:
        assert [ws.recv(timeout=10) for _ in range(3)] == ['{"left":3}', '{"left":2}',
                                                          '{"left":1}']
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000, "liftoff")

    assert httpx.get(f"{http_url}/chat/").json() == "http still works"


# ---------------------------------------------------------------- composition


@serve.deployment
class Adder:
    def __init__(self, n: int) -> None:
        self.n = n

    def add(self, x: int) -> int:
        return x + self.n


calc_app = FastAPI()


@serve.deployment
@serve.ingress(calc_app)
class Calculator:
    def __init__(self, adder: DeploymentHandle) -> None:
        self.adder = adder

    @calc_app.get("/add/{x}")
    async def add(self, x: int) -> dict:
        return {"result": await self.adder.add.remote(x)}

    @calc_app.get("/add-sync/{x}")
    def add_sync(self, x: int) -> dict:
        # A sync route runs in a thread: blocking on `.result()` is fine there.
        return {"result": self.adder.add.remote(x).result(timeout_s=10)}

    @calc_app.get("/twice/{x}")
    async def twice(self, x: int) -> dict:
        first = await self.adder.add.remote(x)
        return {"result": await self.adder.add.remote(first)}


def test_handles_to_other_deployments_inside_routes(http_url: str) -> None:
    serve.run(Calculator.bind(Adder.bind(100)), route_prefix="/calc")
    with httpx.Client(base_url=f"{http_url}/calc") as client:
        assert client.get("/add/1").json() == {"result": 101}
        assert client.get("/add-sync/2").json() == {"result": 102}
        assert client.get("/twice/3").json() == {"result": 203}
        assert client.get("/add/x").status_code == 422


# ------------------------------------------------------------- other shapes


def test_ingress_class_with_call_is_rejected_at_decoration() -> None:
    app = FastAPI()
    with pytest.raises(ValueError, match=r"Bad.*__call__"):
        @serve.deployment
        @serve.ingress(app)
        class Bad:
            @app.get("/")
            def root(self):
                return "unreachable"

            def __call__(self, request):
                return "never"

    with pytest.raises(TypeError, match="ASGI app"):
        serve.ingress(42)


def test_plain_starlette_app_as_ingress(http_url: str) -> None:
    async def hello(request):
        return PlainTextResponse(f"hi {request.path_params['name']} "
                                 f"({request.scope['root_path']})")

    async def echo(request):
        body = await request.body()
        return PlainTextResponse(body[::-1], status_code=202)

    app = Starlette(routes=[Route("/hello/{name}", hello),
                            Route("/echo", echo, methods=["POST"])])

    @serve.deployment
    @serve.ingress(app)
    class Plain:
        pass

    serve.run(Plain.bind(), route_prefix="/plain")
    with httpx.Client(base_url=f"{http_url}/plain") as client:
        hello_response = client.get("/hello/zoe")
        assert (hello_response.status_code, hello_response.text) == (200, "hi zoe (/plain)")
        echoed = client.post("/echo", content=b"abc")
        assert (echoed.status_code, echoed.text) == (202, "cba")
        assert client.get("/echo").status_code == 405
        assert client.get("/missing").status_code == 404
