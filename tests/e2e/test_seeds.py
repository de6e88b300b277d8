"""The Python examples of the seeds (/work/shared/seeds/), run word for word.

Only the imports differ: ``from ladle import serve`` for ``from ray import
serve``, and ``import ladle as ray`` so that ``ray.get(...)`` stays as written.
The HTTP calls (``requests.get("http://localhost:8000/...")``) are left out:
they need the HTTP proxy, which is the later HTTP issue; its tests
(tests/http/) cover them.  Everything Python-side runs.
"""

# Annotations stay unevaluated, as a reader running the docs on a recent Python
# would see: the DeploymentResponseGenerator example annotates with
# `Generator[int]` (a TypeError on 3.11) and `AsyncIterator` (never imported).
from __future__ import annotations

import asyncio

import ladle as ray
from ladle import serve
from ladle.serve.handle import DeploymentHandle


# ------------------------------------------------- serve-handle-explainer.md
# (and the same examples in http-and-python-calls.rst)


def test_explainer_get_handle_and_method_calls() -> None:
    @serve.deployment
    class Deployment:
        def method1(self, arg):
            return f"Method1: {arg}"

        def __call__(self, arg):
            return f"__call__: {arg}"

    Deployment.deploy()

    handle = Deployment.get_handle()
    ray.get(handle.remote("hi")) # Defaults to calling the __call__ method.
    ray.get(handle.method1.remote("hi")) # Call a different method.

    # What the comments promise:
    assert ray.get(handle.remote("hi")) == "__call__: hi"
    assert ray.get(handle.method1.remote("hi")) == "Method1: hi"


def test_explainer_http_and_python_share_logic(capsys) -> None:
    @serve.deployment(route_prefix="/api")
    class Deployment:
        def say_hello(self, name: str):
            return f"Hello {name}!"

        def __call__(self, request):
            return self.say_hello(request.query_params["name"])

    Deployment.deploy()

    # print(requests.get("http://localhost:8000/api?name=Alice")) is left out:
    # it needs the HTTP proxy (the later HTTP issue, tests/http/).
    # # Hello Alice!

    handle = Deployment.get_handle()
    print(ray.get(handle.say_hello.remote("Alice")))
    # Hello Alice!

    assert capsys.readouterr().out == "Hello Alice!\n"
    assert serve.status().applications["Deployment"].route_prefix == "/api"


def test_explainer_sync_and_async_handles() -> None:
    # "Sync and Async Handles": sync=True (the default) returns refs directly;
    # sync=False must be used inside an event loop, `await handle.remote()`
    # gives the ref, and awaiting the ref gives the value.
    @serve.deployment
    class Deployment:
        def method1(self, arg):
            return f"Method1: {arg}"

        def __call__(self, arg):
            return f"__call__: {arg}"

    Deployment.deploy()

    sync_handle = Deployment.get_handle(sync=True)
    assert ray.get(sync_handle.remote("hi")) == "__call__: hi"

    async def main():
        handle = Deployment.get_handle(sync=False)
        ref = await handle.remote("hi")
        method_ref = await handle.method1.remote("hi")
        return await ref, await method_ref

    assert asyncio.run(main()) == ("__call__: hi", "Method1: hi")


# ------------------------------------------------- http-and-python-calls.rst


def test_http_doc_counter_deploys_and_cors_start() -> None:
    # The HTTP page's Python side.  The requests to /counter, and the
    # `@serve.ingress(app)` FastAPI examples (serve.ingress is part of the HTTP
    # proxy), belong to the later HTTP issue and its tests (tests/http/).
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    client = serve.start(
        http_options={"middlewares": [
            Middleware(
                CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
        ]})

    @serve.deployment(route_prefix="/counter")
    class Counter:
        def __call__(self, request):
            pass

    Counter.deploy()

    assert client is None  # serve.start returns nothing in Serve 2.x either
    app = serve.status().applications["Counter"]
    assert (str(app.status), app.route_prefix) == ("RUNNING", "/counter")


# --------------------------------- ray-serve-handle-source.txt, docstrings
# (also deployment-response.txt, where the examples lost their indentation:
# `async def __call__` belongs inside `class Caller`, as in the source)


def test_deployment_response_docstring_await_inside_result_outside() -> None:
    @serve.deployment
    class Downstream:
        def say_hi(self, message: str) -> str:
            return f"Hello {message}!"

    @serve.deployment
    class Caller:
        def __init__(self, handle: DeploymentHandle):
            self._downstream_handle = handle

        async def __call__(self, message: str) -> str:
            # Inside a deployment: `await` the result to enable concurrency.
            response = self._downstream_handle.say_hi.remote(message)
            return await response

    app = Caller.bind(Downstream.bind())
    handle: DeploymentHandle = serve.run(app)

    # Outside a deployment: call `.result()` to get output.
    response = handle.remote("world")
    assert response.result() == "Hello world!"


def test_deployment_response_docstring_pass_response_to_another_call() -> None:
    @serve.deployment
    class Adder:
        def add(self, val: int) -> int:
            return val + 1

    @serve.deployment
    class Caller:
        def __init__(self, handle: DeploymentHandle):
            self._adder_handle = handle

        async def __call__(self, start: int) -> int:
            return await self._adder_handle.add.remote(
                # Pass the response directly to another handle call without awaiting.
                self._adder_handle.add.remote(start)
            )

    app = Caller.bind(Adder.bind())
    handle: DeploymentHandle = serve.run(app)
    assert handle.remote(0).result() == 2


def test_deployment_response_generator_docstring() -> None:
    from typing import AsyncGenerator, Generator  # noqa: F401  (as in the docs)

    from ladle import serve
    from ladle.serve.handle import DeploymentHandle

    @serve.deployment
    class Streamer:
        def generate_numbers(self, limit: int) -> Generator[int]:
            for i in range(limit):
                yield i

    @serve.deployment
    class Caller:
        def __init__(self, handle: DeploymentHandle):
            # Set `stream=True` on the handle to enable streaming calls.
            self._streaming_handle = handle.options(stream=True)

        async def __call__(self, limit: int) -> AsyncIterator[int]:
            gen: DeploymentResponseGenerator = (
                self._streaming_handle.generate_numbers.remote(limit)
            )

            # Inside a deployment: use `async for` to enable concurrency.
            async for i in gen:
                yield i

    app = Caller.bind(Streamer.bind())
    handle: DeploymentHandle = serve.run(app)

    # Outside a deployment: use a standard `for` loop.
    gen: DeploymentResponseGenerator = handle.options(stream=True).remote(10)
    assert [i for i in gen] == list(range(10))


def test_deployment_handle_docstring() -> None:
    import ladle as ray  # noqa: F401  (`import ray` in the docs)
    from ladle import serve
    from ladle.serve.handle import DeploymentHandle, DeploymentResponse  # noqa: F401

    # Two slips of the docs are fixed as a reader would: `__call__` uses
    # `self._handle`, which the constructor never sets (it is
    # `self._downstream_handle`), and `say_hi` has an unreachable
    # `self._message = message` after its `return` (dropped).
    @serve.deployment
    class Downstream:
        def say_hi(self, message: str):
            return f"Hello {message}!"

    @serve.deployment
    class Ingress:
        def __init__(self, handle: DeploymentHandle):
            self._downstream_handle = handle

        async def __call__(self, name: str) -> str:
            response = self._downstream_handle.say_hi.remote(name)
            return await response

    app = Ingress.bind(Downstream.bind())
    handle: DeploymentHandle = serve.run(app)
    response = handle.remote("world")
    assert response.result() == "Hello world!"

    # DeploymentHandle.options docstring: other method plus a model id.
    @serve.deployment
    class Model:
        def other_method(self):
            return serve.get_multiplexed_model_id()

    handle = serve.run(Model.bind(), name="options", route_prefix="/options")
    response: DeploymentResponse = handle.options(
        method_name="other_method",
        multiplexed_model_id="model:v1",
    ).remote()
    assert response.result() == "model:v1"


def test_deployment_handle_remote_docstring() -> None:
    # DeploymentHandle.remote docstring: inside a loop, await the response;
    # pass one response to another call.
    @serve.deployment
    class Double:
        def __call__(self, x: int = 1) -> int:
            return 2 * x

    handle1 = serve.run(Double.bind(), name="one", route_prefix="/one")
    handle2 = serve.run(Double.bind(), name="two", route_prefix="/two")
    handle = handle1

    async def main():
        # Fetch the result directly.
        response = handle.remote()
        result = await response

        # Pass the result to another handle call.
        composed_response = handle2.remote(handle1.remote())
        composed_result = await composed_response
        return result, composed_result

    assert asyncio.run(main()) == (2, 4)
