"""HTTP scenarios: ladle's proxy under wrk, each next to a bare server measured in the same run.

The bare servers (uvicorn with httptools, uvloop and no access log; granian
for information) run the same app in their own process, started from this
module's app factories (``--factory``), and are stopped by pid in
``finally``.  The ladle side starts an instance with its proxy on a free port
of 127.0.0.1 and ``serve.run``s the same code as a deployment.  Load comes
from wrk (``apt-get install -y wrk``), always against 127.0.0.1, always for a
bounded duration: a 1 s warm-up, then 5 s measured (2 s with ``--quick``).
wrk gets 2 threads for 64 connections and 1 for one connection; it shares
the machine's CPUs with the server (and with ladle's proxy and replica).
The streaming scenarios read one response of 20,000 chunks with curl.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from harness import Context, descendant_pids, scenario
from spawn import PYTHON

BENCH_DIR = Path(__file__).resolve().parent
HOST = "127.0.0.1"  # the only address anything here talks to
CONNECTIONS = 64
STREAM_CHUNKS = 20_000
CHUNK = b"x" * 16
WRK_MISSING = "wrk is not installed: apt-get update && apt-get install -y wrk"
CURL_MISSING = "curl is not installed: apt-get update && apt-get install -y curl"
GRANIAN_MISSING = "skipped: granian is not installed (pip install granian; bench only, not a ladle dependency)"


# ----------------------------------------------------------------------------- the apps
# Module-level factories, so that uvicorn and granian load them with --factory
# (the worker runs with this directory first on sys.path, and so do the
# replicas it starts: they find these functions by reference too).


def trivial_app() -> Any:
    """An ASGI app answering every request with "ok" (text/plain), as ladle does for a str."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def fastapi_app() -> Any:
    """A small FastAPI app: one GET route returning a dict."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    return app


async def chunks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield CHUNK


def stream_response(query_string: bytes) -> Any:
    """A StreamingResponse of ``n`` (from the query string) chunks of 16 bytes."""
    from urllib.parse import parse_qs

    from starlette.responses import StreamingResponse

    n = int(parse_qs(query_string.decode()).get("n", [str(STREAM_CHUNKS)])[0])
    return StreamingResponse(chunks(n), media_type="application/octet-stream")


def stream_app() -> Any:
    """An ASGI app streaming ``stream_response``; ladle's deployment returns the same response."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await stream_response(scope["query_string"])(scope, receive, send)

    return app


# ----------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _get_ok(url: str, timeout_s: float) -> bool:
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    assert m is not None and m.group(1) == HOST, url
    conn = http.client.HTTPConnection(HOST, int(m.group(2)), timeout=timeout_s)
    try:
        conn.request("GET", m.group(3) or "/")
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


@contextlib.contextmanager
def bare_server(ctx: Context, server: str, factory: str) -> Iterator[str]:
    """Run ``scenarios_http:factory`` under ``server`` (uvicorn or granian); yield its URL."""
    port = _free_port()
    if server == "uvicorn":
        argv = [PYTHON, "-m", "uvicorn", f"scenarios_http:{factory}", "--factory", "--app-dir", str(BENCH_DIR),
                "--host", HOST, "--port", str(port), "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning", "--lifespan", "off"]
    elif server == "granian":
        argv = [PYTHON, "-m", "granian", "--interface", "asgi", "--factory", "--working-dir", str(BENCH_DIR),
                "--host", HOST, "--port", str(port), "--http", "1", "--no-ws", "--workers", "1",
                "--loop", "uvloop", "--no-access-log", "--log-level", "warning", f"scenarios_http:{factory}"]
    else:
        raise ValueError(server)
    url = f"http://{HOST}:{port}/"
    log = ctx.tmp_dir / f"{server}-{factory}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=BENCH_DIR)
    try:
        deadline = time.monotonic() + min(20.0, ctx.remaining_s())
        while not _get_ok(url, 1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"{server} did not come up on {url} (exit {proc.poll()}): {tail}")
            time.sleep(0.05)
        yield url
    finally:
        _stop(proc)


@contextlib.contextmanager
def ladle_server(app: Any, *, granian: bool = False) -> Iterator[str]:
    """``serve.run(app)`` at route "/" with the proxy on a free port of 127.0.0.1; yield its URL.

    ``granian=True`` serves the proxy with the bench-only ``GranianProxy``
    (``granian_proxy.py``) instead of ladle's uvicorn.
    """
    from ladle import serve
    from ladle._api.lifecycle import http_port

    if granian:
        _granian_or_skip()
        from granian_proxy import use_granian_proxy

        use_granian_proxy()
    try:
        serve.start(http_options={"host": HOST, "port": 0})
        serve.run(app, name="http", route_prefix="/")
        url = f"http://{HOST}:{http_port()}/"
        if not _get_ok(url, 5.0):
            raise RuntimeError(f"ladle's proxy did not answer 200 on {url}")
        yield url
    finally:
        serve.shutdown()


def _granian_or_skip() -> None:
    try:
        import granian  # noqa: F401
    except ImportError:
        raise RuntimeError(GRANIAN_MISSING) from None


# ----------------------------------------------------------------------------- wrk

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _duration_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p50/p90/p99 latency (µs) and error counts from ``wrk --latency`` output."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in", out, re.M)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output: {out.strip()[-300:]!r}")
    figure = {"rps": float(rps.group(1)), "requests": float(total.group(1))}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        if m is not None:
            figure[f"p{q}_us"] = _duration_us(m.group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    figure["non_2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    figure["socket_errors"] = float(sum(int(g) for g in errors.groups())) if errors else 0.0
    return figure


def wrk(ctx: Context, url: str, connections: int, duration_s: float) -> dict[str, float]:
    """One bounded wrk run against ``url``; raises on non-2xx answers or many socket errors."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError(WRK_MISSING)
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"wrk only ever targets {HOST}, not {url}")
    threads = 2 if connections >= 2 else 1
    cmd = [exe, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "5s", "--latency", url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=min(duration_s + 15, ctx.remaining_s()))
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-200:]}")
    figure = parse_wrk(done.stdout)
    if not figure["requests"]:
        raise RuntimeError(f"no request completed in {duration_s:g} s (the server stopped answering)")
    if figure["non_2xx"]:
        raise RuntimeError(f"{figure['non_2xx']:.0f} of {figure['requests']:.0f} responses were not 2xx")
    if figure["socket_errors"] > 0.01 * figure["requests"]:
        raise RuntimeError(f"{figure['socket_errors']:.0f} socket errors in {figure['requests']:.0f} requests")
    return figure


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _role(pid: int) -> str:
    """What a process this worker started is: ladle's ``proxy``, a ``replica``, or the bare ``server``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "server"
    if any(b"replica_main" in arg for arg in argv):
        return "proxy" if b"proxy" in argv else "replica"
    return "server"


def _measure(ctx: Context, url: str, connections: int) -> dict[str, float]:
    """1 s of warm-up, then the measured run (5 s, 2 s with ``--quick``).

    Adds ``<role>_cpu_us``: CPU time per request of the servers this worker
    started (the bare server, or ladle's proxy and replica), from /proc.
    """
    wrk(ctx, url, connections, 1)
    pids = descendant_pids()
    before = {pid: _cpu_s(pid) for pid in pids}
    figure = wrk(ctx, url, connections, ctx.scale(5, 2))
    for pid in pids:
        key = f"{_role(pid)}_cpu_us"
        used_us = (_cpu_s(pid) - before[pid]) * 1e6 / figure["requests"]
        figure[key] = figure.get(key, 0.0) + used_us
    return figure


def _cpu_extras(figure: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in figure.items() if k.endswith("_cpu_us")}


def throughput(ctx: Context, url: str) -> dict[str, float]:
    """Requests/s with 64 connections; extras: latency percentiles (µs), requests, CPU µs per request."""
    f = _measure(ctx, url, CONNECTIONS)
    return {"value": f["rps"], "p50_us": f["p50_us"], "p99_us": f["p99_us"], "requests": f["requests"],
            **_cpu_extras(f)}


def latency(ctx: Context, url: str) -> dict[str, float]:
    """p50/p99 (µs) of one connection sending requests back to back; extras: requests/s, CPU µs per request."""
    f = _measure(ctx, url, 1)
    return {"p50": f["p50_us"], "p99": f["p99_us"], "p90": f["p90_us"], "rps": f["rps"], **_cpu_extras(f)}


def stream_rate(ctx: Context, url: str) -> dict[str, float]:
    """Chunks/s of one streamed response read whole by curl: median of 3 after a warm-up.

    curl times the transfer itself (``time_total``: connect to last byte), so
    its process start is not counted; the body size is checked.
    """
    exe = shutil.which("curl")
    if exe is None:
        raise RuntimeError(CURL_MISSING)

    def once(n: int) -> float:
        done = subprocess.run([exe, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{time_total}",
                               f"{url}?n={n}"], capture_output=True, text=True, timeout=ctx.remaining_s())
        code, size, seconds = done.stdout.split()
        if code != "200" or int(size) != n * len(CHUNK):
            raise RuntimeError(f"stream of {n} chunks: HTTP {code}, {size} bytes (expected {n * len(CHUNK)})")
        return n / float(seconds)

    once(1_000)
    rates = [once(STREAM_CHUNKS) for _ in range(3)]
    return {"value": statistics.median(rates), "best": max(rates), "worst": min(rates), "chunks": STREAM_CHUNKS}


# ----------------------------------------------------------------------------- ladle apps
# Defined inside functions; they call the module-level code above, so a bare
# server and ladle run the same app code.


def _ladle_ok(**options: Any) -> Any:
    """The trivial deployment; ``options`` as for ``Deployment.options`` (defaults otherwise)."""
    from ladle import serve

    @serve.deployment
    class Ok:
        def __call__(self, request: Any) -> str:
            return "ok"

    return (Ok.options(**options) if options else Ok).bind()


def _ladle_ok_async() -> Any:
    from ladle import serve

    @serve.deployment
    class OkAsync:
        async def __call__(self, request: Any) -> str:
            return "ok"

    return OkAsync.bind()


def _ladle_fastapi() -> Any:
    from ladle import serve

    @serve.deployment
    @serve.ingress(fastapi_app())
    class Api:
        pass

    return Api.bind()


def _ladle_stream() -> Any:
    from ladle import serve

    @serve.deployment
    class Stream:
        def __call__(self, request: Any) -> Any:
            return stream_response(request.scope["query_string"])

    return Stream.bind()


# ----------------------------------------------------------------------------- scenarios

_HTTP_TIMEOUT_S = 60.0


@scenario("http_bare_uvicorn_64", "req/s", better="higher", timeout_s=_HTTP_TIMEOUT_S)
def http_bare_uvicorn_64(ctx: Context) -> dict[str, float]:
    """Bare uvicorn (httptools, uvloop, no access log) serving "ok"; wrk -t2 -c64."""
    with bare_server(ctx, "uvicorn", "trivial_app") as url:
        return throughput(ctx, url)


@scenario("http_bare_granian_64", "req/s", baseline="http_bare_uvicorn_64", better="higher",
          timeout_s=_HTTP_TIMEOUT_S)
def http_bare_granian_64(ctx: Context) -> dict[str, float]:
    """For information: the same app under granian (ASGI, one worker, uvloop); wrk -t2 -c64."""
    _granian_or_skip()
    with bare_server(ctx, "granian", "trivial_app") as url:
        return throughput(ctx, url)


@scenario("http_ladle_64", "req/s", baseline="http_bare_uvicorn_64", better="higher", target_ratio=0.5,
          timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_64(ctx: Context) -> dict[str, float]:
    """A deployment whose ``__call__`` returns "ok", behind ladle's proxy; wrk -t2 -c64."""
    with ladle_server(_ladle_ok()) as url:
        return throughput(ctx, url)


@scenario("http_ladle_async_64", "req/s", baseline="http_bare_uvicorn_64", better="higher",
          timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_async_64(ctx: Context) -> dict[str, float]:
    """As ``http_ladle_64`` with an ``async def __call__`` (no thread hop); for information."""
    with ladle_server(_ladle_ok_async()) as url:
        return throughput(ctx, url)


@scenario("http_ladle_wide_64", "req/s", baseline="http_bare_uvicorn_64", better="higher",
          timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_wide_64(ctx: Context) -> dict[str, float]:
    """As ``http_ladle_64`` with ``max_ongoing_requests=64`` instead of the default 5; for
    information: it shows what the default's proxy-replica round trips cost."""
    with ladle_server(_ladle_ok(max_ongoing_requests=CONNECTIONS)) as url:
        return throughput(ctx, url)


@scenario("http_ladle_granian_64", "req/s", baseline="http_ladle_64", better="higher", timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_granian_64(ctx: Context) -> dict[str, float]:
    """As ``http_ladle_64`` with granian as the proxy's server (``granian_proxy.py``); ratio vs uvicorn's."""
    with ladle_server(_ladle_ok(), granian=True) as url:
        return throughput(ctx, url)


@scenario("http_bare_uvicorn_1", "µs", better="lower", timeout_s=_HTTP_TIMEOUT_S)
def http_bare_uvicorn_1(ctx: Context) -> dict[str, float]:
    """Bare uvicorn, one connection, requests back to back (wrk -t1 -c1 --latency)."""
    with bare_server(ctx, "uvicorn", "trivial_app") as url:
        return latency(ctx, url)


@scenario("http_ladle_1", "µs", baseline="http_bare_uvicorn_1", better="lower", target=1000.0,
          timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_1(ctx: Context) -> dict[str, float]:
    """ladle's "ok" deployment, one connection, requests back to back (wrk -t1 -c1 --latency)."""
    with ladle_server(_ladle_ok()) as url:
        return latency(ctx, url)


@scenario("http_ladle_granian_1", "µs", baseline="http_ladle_1", better="lower", timeout_s=_HTTP_TIMEOUT_S)
def http_ladle_granian_1(ctx: Context) -> dict[str, float]:
    """As ``http_ladle_1`` with granian as the proxy's server; ratio vs uvicorn's."""
    with ladle_server(_ladle_ok(), granian=True) as url:
        return latency(ctx, url)


@scenario("http_fastapi_bare_64", "req/s", better="higher", timeout_s=_HTTP_TIMEOUT_S)
def http_fastapi_bare_64(ctx: Context) -> dict[str, float]:
    """A FastAPI app (one async GET route returning a dict) under bare uvicorn; wrk -t2 -c64."""
    with bare_server(ctx, "uvicorn", "fastapi_app") as url:
        return throughput(ctx, url)


@scenario("http_fastapi_ladle_64", "req/s", baseline="http_fastapi_bare_64", better="higher", target_ratio=0.5,
          timeout_s=_HTTP_TIMEOUT_S)
def http_fastapi_ladle_64(ctx: Context) -> dict[str, float]:
    """The same FastAPI app as a ``@serve.ingress`` deployment; wrk -t2 -c64."""
    with ladle_server(_ladle_fastapi()) as url:
        return throughput(ctx, url)


@scenario("http_stream_bare", "chunks/s", better="higher", timeout_s=_HTTP_TIMEOUT_S)
def http_stream_bare(ctx: Context) -> dict[str, float]:
    """20,000 chunks of 16 bytes (StreamingResponse over an async generator), bare uvicorn; curl."""
    with bare_server(ctx, "uvicorn", "stream_app") as url:
        return stream_rate(ctx, url)


@scenario("http_stream_ladle", "chunks/s", baseline="http_stream_bare", better="higher", target_ratio=5.0,
          timeout_s=_HTTP_TIMEOUT_S)
def http_stream_ladle(ctx: Context) -> dict[str, float]:
    """The same StreamingResponse returned by a deployment's ``__call__``, through the proxy; curl."""
    with ladle_server(_ladle_stream()) as url:
        return stream_rate(ctx, url)
