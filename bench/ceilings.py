"""Ceilings: what plain Python and uvloop manage with no framework in the way.

Each scenario talks the echo protocol of ``echo.py`` to a server process over
a Unix socket in the run's private temp dir, or (``inproc_await``) stays in
one loop.  Ladle scenarios name one of these as their baseline: a sync
caller's latency against ``pingpong_thread_uvloop``, async throughput against
``pingpong_pipelined`` (one write per frame at both ends, a Future per reply
awaited by one of 1000 callers: the least work any RPC does per message).
``pingpong_pipelined_batched`` answers each read with one write and is shown
for information.  A message is 64 bytes behind a 4-byte length.
``python_startup`` and ``python_idle_rss`` time and weigh bare interpreters,
the baselines of the startup and memory scenarios.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import ExitStack
from typing import cast

import uvloop

from echo import HEADER, FrameParser, echo_server, frame, recv_exact, set_recv_timeout
from harness import (
    Context,
    Stopwatch,
    closed_loop,
    closed_loop_timing,
    last_cpu,
    pss_bytes,
    rss_bytes,
    scenario,
)
from spawn import PYTHON, first_line, hold

PAYLOAD = b"x" * 64
WINDOW = 1000  # frames in flight in the pipelined scenarios
SAMPLE_EVERY = 500  # round trips between looks at which CPUs the parties are on


def _on_one_cpu(parties: list[tuple[int, int | None]]) -> bool:
    # Round trips are ~3x slower when the scheduler puts the two ends on
    # different cores of this VM, and it picks per run; this says which it was.
    return len({last_cpu(pid, tid) for pid, tid in parties}) == 1


@scenario("pingpong_blocking", "µs", better="lower", timeout_s=60.0)
def pingpong_blocking(ctx: Context) -> dict[str, float]:
    """Round trip between two processes, both on blocking sockets."""
    warmup, n = ctx.scale(2_000, 500), ctx.scale(20_000, 3_000)
    path = ctx.tmp_dir / "blocking.sock"
    msg = frame(PAYLOAD)
    buf = bytearray(len(msg))
    view = memoryview(buf)
    watch = Stopwatch()
    looks: list[bool] = []
    with echo_server("blocking", path, deadline_s=ctx.remaining_s()) as server_pid:
        parties: list[tuple[int, int | None]] = [(os.getpid(), None), (server_pid, None)]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            set_recv_timeout(sock, ctx.remaining_s())
            for i in range(warmup + n):
                if i == warmup:
                    watch.clear()
                if i >= warmup and i % SAMPLE_EVERY == 0:
                    looks.append(_on_one_cpu(parties))
                watch.start()
                sock.sendall(msg)
                if not recv_exact(sock, view[:4]):
                    raise ConnectionError("echo server closed the connection")
                recv_exact(sock, view[4 : 4 + HEADER.unpack_from(buf)[0]])
                watch.stop()
    return {**watch.summary_us(), "one_cpu": sum(looks) / max(1, len(looks))}


class _ReplyProtocol(asyncio.Protocol):
    """Client side on the loop thread: replies resolve waiters in FIFO order."""

    def __init__(self) -> None:
        self.pending: deque[Future[bytes]] = deque()
        self.closed: Future[None] = Future()
        self.transport: asyncio.Transport | None = None
        self._parser = FrameParser()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, msg: bytes, waiter: Future[bytes]) -> None:
        assert self.transport is not None
        self.pending.append(waiter)
        self.transport.write(msg)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        for payload in self._parser.feed(data):
            self.pending.popleft().set_result(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.pending:
            self.pending.popleft().set_exception(ConnectionError("echo server connection lost"))
        self.closed.set_result(None)


@scenario("pingpong_thread_uvloop", "µs", better="lower", timeout_s=60.0)
def pingpong_thread_uvloop(ctx: Context) -> dict[str, float]:
    """A sync caller hands each message to a uvloop thread and blocks on a Future."""
    warmup, n = ctx.scale(2_000, 500), ctx.scale(20_000, 3_000)
    path = ctx.tmp_dir / "uvloop.sock"
    msg = frame(PAYLOAD)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-uvloop", daemon=True)
    thread.start()
    watch = Stopwatch()
    looks: list[bool] = []
    try:
        with echo_server("uvloop", path, deadline_s=ctx.remaining_s()) as server_pid:
            pid = os.getpid()
            parties = [(pid, threading.get_native_id()), (pid, thread.native_id), (server_pid, None)]
            connect = loop.create_unix_connection(_ReplyProtocol, str(path))
            _, proto = asyncio.run_coroutine_threadsafe(connect, loop).result(ctx.remaining_s())
            try:
                for i in range(warmup + n):
                    if i == warmup:
                        watch.clear()
                    if i >= warmup and i % SAMPLE_EVERY == 0:
                        looks.append(_on_one_cpu(parties))
                    watch.start()
                    waiter: Future[bytes] = Future()
                    loop.call_soon_threadsafe(proto.send, msg, waiter)
                    waiter.result(ctx.remaining_s())
                    watch.stop()
            finally:
                loop.call_soon_threadsafe(proto.close)
                proto.closed.result(ctx.remaining_s())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        if not thread.is_alive():
            loop.close()
    return {**watch.summary_us(), "one_cpu": sum(looks) / max(1, len(looks))}


class _PipelineProtocol(asyncio.Protocol):
    """Keeps ``window`` frames in flight: each batch of replies triggers as many sends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._parser = FrameParser()
        self._total = self._sent = self._received = 0
        self._done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def start(self, total: int, window: int) -> asyncio.Future[None]:
        self._total, self._received = total, 0
        self._done = asyncio.get_running_loop().create_future()
        self._sent = min(window, total)
        self._write(self._sent)
        return self._done

    def _write(self, count: int) -> None:
        assert self.transport is not None
        self.transport.write(b"".join([frame(PAYLOAD) for _ in range(count)]))

    def data_received(self, data: bytes) -> None:
        got = len(self._parser.feed(data))
        self._received += got
        more = min(got, self._total - self._sent)
        if more > 0:
            self._sent += more
            self._write(more)
        if self._received >= self._total and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError("echo server connection lost"))


async def _pipeline(path: str, warmup: int, total: int, runs: int, timeout_s: float) -> list[float]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_unix_connection(_PipelineProtocol, path)
    rates = []
    try:
        await asyncio.wait_for(proto.start(warmup, WINDOW), timeout_s)
        for _ in range(runs):
            t0 = time.perf_counter()
            await asyncio.wait_for(proto.start(total, WINDOW), timeout_s)
            rates.append(total / (time.perf_counter() - t0))
        return rates
    finally:
        transport.close()


@scenario("pingpong_pipelined_batched", "msg/s", better="higher", timeout_s=60.0)
def pingpong_pipelined_batched(ctx: Context) -> dict[str, float]:
    """Information only: 1000 frames in flight, one batched write per read at both ends."""
    warmup, total = ctx.scale(10_000, 2_000), ctx.scale(100_000, 20_000)
    path = ctx.tmp_dir / "batched.sock"
    with echo_server("uvloop", path, deadline_s=ctx.remaining_s()):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            rates = runner.run(_pipeline(str(path), warmup, total, 3, ctx.remaining_s()))
    return {"value": statistics.median(rates), "best": max(rates), "worst": min(rates)}


async def _pipeline_futures(path: str, ctx: Context) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[bytes]] = deque()
    parser = FrameParser()

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            for payload in parser.feed(data):
                pending.popleft().set_result(payload)

        def connection_lost(self, exc: Exception | None) -> None:
            while pending:
                pending.popleft().set_exception(ConnectionError("echo server connection lost"))

    transport, _ = await loop.create_unix_connection(Client, path)
    write = transport.write

    def call() -> asyncio.Future[bytes]:
        reply: asyncio.Future[bytes] = loop.create_future()
        pending.append(reply)
        write(frame(PAYLOAD))
        return reply

    try:
        return await closed_loop(call, concurrency=WINDOW, **closed_loop_timing(ctx))
    finally:
        transport.close()


@scenario("pingpong_pipelined", "msg/s", better="higher", timeout_s=60.0)
def pingpong_pipelined(ctx: Context) -> dict[str, float]:
    """1000 messages in flight, one write per frame at both ends, a Future per reply."""
    path = ctx.tmp_dir / "pipelined.sock"
    with echo_server("uvloop_each", path, deadline_s=ctx.remaining_s()):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_pipeline_futures(str(path), ctx))


STARTUP_RUNS = (5, 2)  # fresh processes timed per startup figure (full, quick), after one untimed
MB = 1024 * 1024


def startup_figure(ctx: Context, cmd: list[str], check: str) -> dict[str, float]:
    """Median seconds from ``Popen`` to cmd printing its first line, over fresh processes.

    The first line must start with ``check``; anything after it that parses as
    ``key=value`` pairs (seconds, measured by the child) is averaged into extras.
    One untimed run first warms the page cache and bytecode caches.
    """
    runs = ctx.scale(*STARTUP_RUNS)
    times: list[float] = []
    extras: dict[str, list[float]] = {}
    for i in range(runs + 1):
        elapsed, line = first_line(cmd, stderr_path=ctx.tmp_dir / "stderr.txt", timeout_s=ctx.remaining_s())
        word, *pairs = line.split()
        if word != check:
            raise RuntimeError(f"expected {check!r} first, the child printed {line!r}")
        if i == 0:
            continue
        times.append(elapsed)
        for key, _, value in (pair.partition("=") for pair in pairs):
            extras.setdefault(key, []).append(float(value))
    return {"value": statistics.median(times), "best": min(times), "worst": max(times), "n": runs,
            **{key: statistics.median(values) for key, values in extras.items()}}


@scenario("python_startup", "s", better="lower", timeout_s=60.0)
def python_startup(ctx: Context) -> dict[str, float]:
    """A fresh ``python -c "print(1)"``, from ``Popen`` to its output; median of 5 (2 quick)."""
    return startup_figure(ctx, [PYTHON, "-c", "print(1)"], "1")


@scenario("python_idle_rss", "MB", better="lower", timeout_s=30.0)
def python_idle_rss(ctx: Context) -> dict[str, float]:
    """RSS of three bare idle interpreters (``time.sleep``), summed, for reference."""
    code = "import time; print('ready', flush=True); time.sleep(60)"
    with ExitStack() as stack:
        pids = [stack.enter_context(hold([PYTHON, "-c", code], stderr_path=ctx.tmp_dir / f"stderr{i}.txt",
                                         timeout_s=ctx.remaining_s(), grace_s=0))[0] for i in range(3)]
        time.sleep(0.3 if ctx.quick else 1.0)
        rss = [rss_bytes([pid]) / MB for pid in pids]
        pss = pss_bytes(pids) / MB
    return {"value": sum(rss), "per_process": statistics.median(rss), "pss": pss}


async def _noop() -> None:
    return None


async def _await_many(n: int) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        await _noop()
    return time.perf_counter_ns() - t0


@scenario("inproc_await", "µs", better="lower", timeout_s=30.0)
def inproc_await(ctx: Context) -> float:
    """``await`` of a trivial coroutine inside a uvloop loop; median of 5 runs."""
    n = ctx.scale(1_000_000, 200_000)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_await_many(n // 10))
        runs = [runner.run(_await_many(n)) / n / 1000.0 for _ in range(5)]
    return statistics.median(runs)
