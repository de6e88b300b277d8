"""What Ray Serve's documentation examples rely on, checked against ladle.

Each test covers behaviour one or more files of Ray's ``doc/source/serve/doc_code``
exercise (docs/ray-doc-examples.md lists them); the code is ours, written to
pin the behaviour down, not the examples pasted in.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ladle import serve
from ladle.handle import DeploymentHandle


# ------------------------------------------- plain return values over HTTP


@serve.deployment
class Returns:
    """Answers the kind of value the query names, from an async or a sync method."""

    async def __call__(self, request: Request) -> object:
        return _value(request.query_params["kind"])


@serve.deployment
class SyncReturns:
    def __call__(self, request: Request) -> object:
        return _value(request.query_params["kind"])


def _value(kind: str) -> object:
    return {"none": None, "bytes": b"\x00raw", "bytearray": bytearray(b"ba"),
            "str": "text", "list": [1, None]}[kind]


@pytest.mark.parametrize("deployment", [Returns, SyncReturns], ids=["async", "sync"])
def test_plain_values_get_rays_body_and_content_type(http_url: str, deployment: object) -> None:
    # create_deployment.py's ingress returns None; Ray answers an empty text/plain body.
    serve.run(deployment.bind(), route_prefix="/v")  # type: ignore[attr-defined]
    with httpx.Client(base_url=http_url, timeout=15) as client:
        def get(kind: str) -> tuple[int, bytes, str]:
            response = client.get("/v", params={"kind": kind})
            return response.status_code, response.content, response.headers["content-type"]

        assert get("none") == (200, b"", "text/plain")
        assert get("bytes") == (200, b"\x00raw", "text/plain")
        assert get("bytearray") == (200, b"ba", "text/plain")
        assert get("str") == (200, b"text", "text/plain; charset=utf-8")
        assert get("list") == (200, b"[1,null]", "application/json")


# ------------------------------------------------------- handle options


@serve.deployment
class Payload:
    def __call__(self, data: bytes) -> str:
        return f"processed {len(data)} bytes"


@serve.deployment
class Caller:
    def __init__(self, target: DeploymentHandle) -> None:
        # interdeployment_grpc.py: Ray picks its transport with `_by_reference`.
        self._by_ref = target.options(_by_reference=True)
        self._by_value = target.options(_by_reference=False)

    async def __call__(self, data: bytes) -> list[str]:
        return [await self._by_ref.remote(data), await self._by_value.remote(data)]


def test_by_reference_option_is_accepted_and_changes_no_result() -> None:
    handle = serve.run(Caller.bind(Payload.bind()))
    assert handle.remote(b"x" * 1024).result(timeout_s=30) == ["processed 1024 bytes"] * 2
    assert handle.options(_by_reference=True).remote(b"ab").result(timeout_s=30) == [
        "processed 2 bytes"] * 2


def test_by_reference_must_be_a_bool() -> None:
    handle = serve.run(Payload.bind())
    with pytest.raises(TypeError, match="_by_reference must be a bool, got str"):
        handle.options(_by_reference="yes")


# ------------------------------------------------------------- imports


def test_starlette_requests_is_an_attribute_after_importing_ladle_serve() -> None:
    # key_concepts.py, image_classifier_example.py: `import starlette`, then
    # `starlette.requests.Request` in an annotation evaluated at class definition.
    code = textwrap.dedent("""
        import starlette
        from ladle import serve

        @serve.deployment
        class Ingress:
            async def __call__(self, request: starlette.requests.Request) -> str:
                return "ok"

        assert starlette.responses.Response is not None
        print("defined", Ingress.name)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "defined Ingress"


# --------------------------------------- what the runnable examples exercise


@serve.deployment
class Echo:
    def __init__(self, text: str) -> None:
        self._text = text

    def __call__(self, request: Request) -> str:
        return self._text


def test_each_run_of_the_default_app_replaces_the_previous_one(http_url: str) -> None:
    # class_nodes.py / language_example.py: serve.run three times on "/".
    with httpx.Client(base_url=http_url, timeout=15) as client:
        for text in ("foo", "bar", "baz"):
            serve.run(Echo.bind(text))
            assert client.get("/").text == text
    assert list(serve.status().applications) == ["default"]


@serve.deployment
class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, request: Request) -> dict[str, int]:
        self.count += 1
        return {"count": self.count}


def test_state_is_kept_across_http_requests_to_one_replica(http_url: str) -> None:
    # monitoring/deployment_logger.py: 10 requests, then the 11th sees count 11.
    serve.run(Counter.bind())
    with httpx.Client(base_url=http_url, timeout=15) as client:
        for _ in range(10):
            client.get("/")
        assert client.get("/").json() == {"count": 11}


def test_an_incoming_request_id_is_sent_back(http_url: str) -> None:
    # monitoring/request_id.py prints the X-Request-ID the server answers with.
    serve.run(Echo.bind("one"))
    response = httpx.get(http_url, headers={"X-Request-ID": "123-234"}, timeout=15)
    assert response.headers["X-Request-ID"] == "123-234"


@serve.deployment
class Numbers:
    def generate(self, limit: int):  # type: ignore[no-untyped-def]
        for i in range(limit):
            yield str(i)

    def __call__(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self.generate(int(request.query_params["max"])),
                                 media_type="text/plain")


def test_a_sync_generator_streams_over_http_chunk_by_chunk(http_url: str) -> None:
    # http_guide/streaming_example.py and batching_guide.py check each chunk.
    serve.run(Numbers.bind())
    with httpx.Client(base_url=http_url, timeout=15) as client:
        with client.stream("GET", "/", params={"max": 5}) as response:
            assert response.status_code == 200
            assert "".join(response.iter_text()) == "01234"


@serve.deployment
class Adder:
    def __init__(self, increment: int) -> None:
        self._increment = increment

    def __call__(self, value: int) -> int:
        return value + self._increment


@serve.deployment
class Multiplier:
    def __call__(self, value: int) -> int:
        return value * 2


@serve.deployment
class Chain:
    def __init__(self, adder: DeploymentHandle, multiplier: DeploymentHandle) -> None:
        self._adder, self._multiplier = adder, multiplier

    async def __call__(self, value: int) -> int:
        return await self._multiplier.remote(self._adder.remote(value))


def test_a_response_passed_on_unawaited_is_resolved_first() -> None:
    # model_composition/chaining_example.py: (5 + 1) * 2.
    handle = serve.run(Chain.bind(Adder.bind(increment=1), Multiplier.bind()))
    assert handle.remote(5).result(timeout_s=30) == 12
