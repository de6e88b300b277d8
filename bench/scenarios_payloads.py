"""Large payloads, the default asyncio loop, and time to first streamed byte (issue 10).

``unix_copy_*`` is the ceiling for moving N bytes between two processes over
a Unix socket: a blocking client ``sendall``s an 8-byte length and the bytes
(a NumPy array's memory), the ``sink`` server of ``echo.py`` reads them into
one reused buffer and answers one byte; the figure is that round trip.  The
ladle rows send a NumPy array of the same size to one replica with
``handle.nbytes.remote(a).result()`` (one way: the answer is an int) or
``handle.echo.remote(a).result()`` (both ways).  ``handle_gather_*`` times
``await asyncio.gather(*[handle.remote(i) for i in range(5000)])`` on the
default loop and on uvloop against the pipelined-socket ceiling.  The HTTP
rows time the first byte of the 20,000-chunk ``StreamingResponse`` of
``scenarios_http`` with curl (``time_starttransfer``), bare uvicorn and ladle.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import subprocess
import time
from typing import Any

from echo import SINK_HEADER, echo_server, recv_exact, set_recv_timeout
from harness import Context, closed_loop, closed_loop_timing, scenario
from scenarios_http import CURL_MISSING, STREAM_CHUNKS, _ladle_stream, bare_server, ladle_server

MiB = 1024 * 1024
SIZES = {"1mib": 1 * MiB, "10mib": 10 * MiB, "100mib": 100 * MiB}
GATHER_CALLS = 5_000
IN_FLIGHT = 1000  # max_ongoing_requests of the gather replica, as in handle_async_throughput


def _runs(ctx: Context, nbytes: int) -> tuple[int, int]:
    """(warm-up, timed) transfers for a payload size: fewer for the large ones."""
    if nbytes >= 100 * MiB:
        return ctx.scale(3, 2), ctx.scale(15, 5)
    if nbytes >= 10 * MiB:
        return ctx.scale(10, 3), ctx.scale(60, 15)
    return ctx.scale(50, 10), ctx.scale(400, 60)


def _summary_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50": statistics.median(ordered) * 1e3, "p99": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
            "best": ordered[0] * 1e3, "n": len(ordered)}


def _array(nbytes: int) -> Any:
    import numpy

    return numpy.ones(nbytes, dtype=numpy.uint8)


def _unix_copy(ctx: Context, nbytes: int) -> dict[str, float]:
    warmup, n = _runs(ctx, nbytes)
    data = memoryview(_array(nbytes)).cast("B")
    path = ctx.tmp_dir / "sink.sock"
    ack = bytearray(1)
    samples = []
    with echo_server("sink", path, deadline_s=ctx.remaining_s()):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            set_recv_timeout(sock, ctx.remaining_s())
            head = SINK_HEADER.pack(nbytes)
            for i in range(warmup + n):
                t0 = time.perf_counter()
                sock.sendall(head)
                sock.sendall(data)
                if not recv_exact(sock, memoryview(ack)):
                    raise ConnectionError("the sink closed the connection")
                if i >= warmup:
                    samples.append(time.perf_counter() - t0)
    return _summary_ms(samples)


def _payload_app() -> Any:
    from ladle import serve

    @serve.deployment
    class Payload:
        def nbytes(self, a: Any) -> int:
            return int(a.nbytes)

        async def echo(self, a: Any) -> Any:
            return a

    return Payload.bind()


def _ladle_payload(ctx: Context, nbytes: int, method: str) -> dict[str, float]:
    from ladle import serve

    warmup, n = _runs(ctx, nbytes)
    array = _array(nbytes)
    samples = []
    try:
        handle = serve.run(_payload_app(), name="payload")
        call = getattr(handle, method)
        for i in range(warmup + n):
            t0 = time.perf_counter()
            got = call.remote(array).result()
            elapsed = time.perf_counter() - t0
            if method == "nbytes" and got != nbytes or method == "echo" and got.nbytes != nbytes:
                raise AssertionError(f"{method} of {nbytes} bytes returned {got!r:.80}")
            del got
            if i >= warmup:
                samples.append(elapsed)
    finally:
        serve.shutdown()
    return _summary_ms(samples)


def _register(size: str, nbytes: int) -> None:
    ceiling = f"unix_copy_{size}"

    @scenario(ceiling, "ms", better="lower", timeout_s=120.0)
    def copy(ctx: Context) -> dict[str, float]:
        """The same bytes over a Unix socket into a reused buffer, round trip."""
        return _unix_copy(ctx, nbytes)

    @scenario(f"payload_oneway_{size}", "ms", baseline=ceiling, better="lower", timeout_s=120.0,
              target_ratio=1.2 if nbytes >= 100 * MiB else None)
    def oneway(ctx: Context) -> dict[str, float]:
        """``handle.nbytes.remote(array).result()``: the array one way, an int back."""
        return _ladle_payload(ctx, nbytes, "nbytes")


for _size, _nbytes in SIZES.items():
    _register(_size, _nbytes)


@scenario("payload_echo_10mib", "ms", baseline="payload_oneway_10mib", better="lower", timeout_s=120.0,
          target_ratio=0.5)
def payload_echo_10mib(ctx: Context) -> dict[str, float]:
    """``handle.echo.remote(array).result()`` of 10 MiB: target under 2x the one-way figure."""
    return _ladle_payload(ctx, 10 * MiB, "echo")


# ----------------------------------------------------------------------------- the default loop


def _gather_app() -> Any:
    from ladle import serve

    @serve.deployment(max_ongoing_requests=IN_FLIGHT)
    class Echo:
        async def __call__(self, x: Any) -> Any:
            return x

    return Echo.bind()


def _gather(ctx: Context, loop_factory: Any) -> dict[str, float]:
    from ladle import serve

    rounds = ctx.scale(7, 3)

    async def once(handle: Any) -> float:
        t0 = time.perf_counter()
        got = await asyncio.gather(*[handle.remote(i) for i in range(GATHER_CALLS)])
        elapsed = time.perf_counter() - t0
        if got[-1] != GATHER_CALLS - 1 or len(got) != GATHER_CALLS:
            raise AssertionError("gather returned the wrong results")
        return GATHER_CALLS / elapsed

    try:
        handle = serve.run(_gather_app(), name="gather")
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(once(handle))
            rates = [runner.run(once(handle)) for _ in range(rounds)]
    finally:
        serve.shutdown()
    return {"value": statistics.median(rates), "best": max(rates), "worst": min(rates), "calls": GATHER_CALLS}


@scenario("handle_gather_default_loop", "msg/s", baseline="pingpong_pipelined", better="higher",
          target_ratio=0.4)
def handle_gather_default_loop(ctx: Context) -> dict[str, float]:
    """``asyncio.gather`` of 5,000 ``handle.remote(i)`` on the standard asyncio loop; median of 7."""
    return _gather(ctx, None)


@scenario("handle_gather_uvloop", "msg/s", baseline="pingpong_pipelined", better="higher")
def handle_gather_uvloop(ctx: Context) -> dict[str, float]:
    """The same on uvloop, for comparison."""
    import uvloop

    return _gather(ctx, uvloop.new_event_loop)


@scenario("handle_async_throughput_default_loop", "msg/s", baseline="pingpong_pipelined", better="higher")
def handle_async_throughput_default_loop(ctx: Context) -> dict[str, float]:
    """``handle_async_throughput`` (1000 closed-loop callers) on the standard asyncio loop."""
    from ladle import serve

    try:
        handle = serve.run(_gather_app(), name="throughput")
        with asyncio.Runner() as runner:
            return runner.run(closed_loop(lambda: handle.remote(1), concurrency=IN_FLIGHT,
                                          **closed_loop_timing(ctx)))
    finally:
        serve.shutdown()


# ----------------------------------------------------------------------------- first streamed byte


def first_byte(ctx: Context, url: str) -> dict[str, float]:
    """Milliseconds to the first byte of the streamed response (curl's ``time_starttransfer``
    less its ``time_connect``), median of 9 after a warm-up; extras: the whole response."""
    exe = shutil.which("curl")
    if exe is None:
        raise RuntimeError(CURL_MISSING)

    def once() -> tuple[float, float]:
        done = subprocess.run([exe, "-s", "-o", "/dev/null", "-w",
                               "%{http_code} %{time_connect} %{time_starttransfer} %{time_total}",
                               f"{url}?n={STREAM_CHUNKS}"], capture_output=True, text=True,
                              timeout=ctx.remaining_s())
        code, connect, first, total = done.stdout.split()
        if code != "200":
            raise RuntimeError(f"HTTP {code}")
        return float(first) - float(connect), float(total) - float(connect)

    once()
    firsts, totals = zip(*[once() for _ in range(ctx.scale(9, 3))])
    return {"p50": statistics.median(firsts) * 1e3, "p99": max(firsts) * 1e3,
            "best": min(firsts) * 1e3, "total_ms": statistics.median(totals) * 1e3}


@scenario("http_stream_ttfb_bare", "ms", better="lower", timeout_s=60.0)
def http_stream_ttfb_bare(ctx: Context) -> dict[str, float]:
    """Time to the first byte of ``http_stream_bare``'s response, bare uvicorn."""
    with bare_server(ctx, "uvicorn", "stream_app") as url:
        return first_byte(ctx, url)


@scenario("http_stream_ttfb_ladle", "ms", baseline="http_stream_ttfb_bare", better="lower", timeout_s=60.0,
          target_ratio=0.5)
def http_stream_ttfb_ladle(ctx: Context) -> dict[str, float]:
    """The same through ladle's proxy (``http_stream_ladle``'s deployment): under 2x bare."""
    with ladle_server(_ladle_stream()) as url:
        return first_byte(ctx, url)
