"""Ladle scenarios: the public API measured against the ceilings in ``ceilings.py``.

Each scenario starts its application with ``serve.run`` in its own worker
process (or, for startup and memory, in a fresh script it starts) and calls
``serve.shutdown()`` in ``finally``.  Deployments are defined inside
functions, so they reach the replicas pickled by value: the replicas cannot
import this module.  Targets are the issue's; ``python bench/run.py`` prints
whether each was met.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from ceilings import MB, startup_figure
from harness import Context, Stopwatch, closed_loop, closed_loop_timing, descendant_pids, pss_bytes, rss_bytes, scenario
from spawn import PYTHON, hold

IN_FLIGHT = 1000  # concurrent requests in handle_async_throughput, as in pingpong_pipelined
STREAM_ITEMS = 20_000


def _echo_app(**options: Any) -> Any:
    """One deployment with trivial methods: async ``__call__``, sync ``sync_echo``, two generators."""
    from ladle import serve

    @serve.deployment(**options)
    class Echo:
        async def __call__(self, x: Any) -> Any:
            return x

        def sync_echo(self, x: Any) -> Any:
            return x

        def items(self, n: int) -> Any:
            yield from range(n)

        async def aitems(self, n: int) -> Any:
            for i in range(n):
                yield i

    return Echo.bind()


def _time_sync_calls(handle: Any, warmup: int, n: int, *, add: int = 0) -> dict[str, float]:
    """p50/p99 of ``handle.remote(i).result()``, one at a time, after ``warmup`` calls."""
    watch = Stopwatch()
    for i in range(warmup + n):
        if i == warmup:
            watch.clear()
        watch.start()
        got = handle.remote(i).result()
        watch.stop()
        if got != i + add:
            raise AssertionError(f"call {i} returned {got!r}, expected {i + add!r}")
    return watch.summary_us()


@scenario("handle_sync_latency", "µs", baseline="pingpong_thread_uvloop", better="lower", target=300.0)
def handle_sync_latency(ctx: Context) -> dict[str, float]:
    """Sequential ``handle.remote(x).result()`` to one replica running an async trivial method.

    Extras: the same through a sync method (run in the replica's thread pool).
    """
    from ladle import serve

    warmup, n = ctx.scale(2_000, 500), ctx.scale(20_000, 3_000)
    try:
        handle = serve.run(_echo_app(), name="latency")
        figure = _time_sync_calls(handle, warmup, n)
        sync = _time_sync_calls(handle.sync_echo, warmup, n)
    finally:
        serve.shutdown()
    return {**figure, "sync_method_p50": sync["p50"], "sync_method_p99": sync["p99"]}


@scenario("handle_async_throughput", "msg/s", baseline="pingpong_pipelined", better="higher", target_ratio=0.4)
def handle_async_throughput(ctx: Context) -> dict[str, float]:
    """``await handle.remote(x)`` from 1000 callers in a uvloop loop, one replica (async method).

    ``max_ongoing_requests=1000`` so that all 1000 are in flight at the
    replica rather than queued in the router.  Same closed-loop timing as
    ``pingpong_pipelined``: warm-up, then the median of three windows.
    """
    import uvloop

    from ladle import serve

    try:
        handle = serve.run(_echo_app(max_ongoing_requests=IN_FLIGHT), name="throughput")
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(closed_loop(lambda: handle.remote(1), concurrency=IN_FLIGHT,
                                          **closed_loop_timing(ctx)))
    finally:
        serve.shutdown()


def _stream_rates(ctx: Context, run_once: Any) -> dict[str, float]:
    """Items/s of ``run_once(n)`` (which returns how many items it got); median of 3 after a warm-up."""
    n = ctx.scale(STREAM_ITEMS, 5_000)
    if (got := run_once(1_000)) != 1_000:
        raise AssertionError(f"warm-up stream gave {got} items, expected 1000")
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        got = run_once(n)
        rates.append(got / (time.perf_counter() - t0))
        if got != n:
            raise AssertionError(f"stream gave {got} items, expected {n}")
    return {"value": statistics.median(rates), "best": max(rates), "worst": min(rates), "items": n}


@scenario("handle_stream_items", "items/s", better="higher", target=100_000.0)
def handle_stream_items(ctx: Context) -> dict[str, float]:
    """20,000 ints from a sync generator on the replica, ``for`` over the response in the driver."""
    from ladle import serve

    try:
        handle = serve.run(_echo_app(), name="stream").options(stream=True).items

        def run_once(n: int) -> int:
            return sum(1 for _ in handle.remote(n))

        return _stream_rates(ctx, run_once)
    finally:
        serve.shutdown()


@scenario("handle_stream_items_async", "items/s", better="higher", target=100_000.0)
def handle_stream_items_async(ctx: Context) -> dict[str, float]:
    """20,000 ints from an async generator, ``async for`` in a uvloop loop in the driver."""
    import uvloop

    from ladle import serve

    try:
        handle = serve.run(_echo_app(), name="stream").options(stream=True).aitems
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:

            async def consume(n: int) -> int:
                count = 0
                async for _ in handle.remote(n):
                    count += 1
                return count

            return _stream_rates(ctx, lambda n: runner.run(consume(n)))
    finally:
        serve.shutdown()


@scenario("composition_latency", "µs", baseline="pingpong_thread_uvloop", better="lower", target=600.0)
def composition_latency(ctx: Context) -> dict[str, float]:
    """The composition example of the ``DeploymentResponse`` docs, called with ``.result()``.

    ``Caller`` (async) awaits ``adder.add.remote(adder.add.remote(x))``: the
    inner response is passed as an argument.  Two deployments, one replica
    each; three round trips per call (driver→Caller, Caller→Adder twice).
    """
    from ladle import serve
    from ladle.handle import DeploymentHandle

    @serve.deployment
    class Adder:
        def add(self, val: int) -> int:
            return val + 1

    @serve.deployment
    class Caller:
        def __init__(self, handle: DeploymentHandle) -> None:
            self._adder_handle = handle

        async def __call__(self, start: int) -> int:
            return await self._adder_handle.add.remote(self._adder_handle.add.remote(start))

    warmup, n = ctx.scale(1_000, 300), ctx.scale(10_000, 2_000)
    try:
        handle = serve.run(Caller.bind(Adder.bind()), name="composition")
        return _time_sync_calls(handle, warmup, n, add=2)
    finally:
        serve.shutdown()


STARTUP_SCRIPT = """\
import time
t0 = time.perf_counter()
from ladle import serve
t1 = time.perf_counter()


@serve.deployment
class Hello:
    def __call__(self, x):
        return x + 1


try:
    handle = serve.run(Hello.bind(), name="startup"{options})
    t2 = time.perf_counter()
    result = handle.remote(1).result()
    t3 = time.perf_counter()
    print(result, f"import_s={{t1 - t0:.6f}} run_s={{t2 - t1:.6f}} first_call_s={{t3 - t2:.6f}}", flush=True)
finally:
    serve.shutdown()
"""


def _startup(ctx: Context, options: str) -> dict[str, float]:
    script = ctx.tmp_dir / "startup.py"
    script.write_text(STARTUP_SCRIPT.format(options=options))
    return startup_figure(ctx, [PYTHON, str(script)], "2")


@scenario("startup_processes", "s", baseline="python_startup", better="lower", target=1.0)
def startup_processes(ctx: Context) -> dict[str, float]:
    """A fresh script: import ladle, ``serve.run`` a one-replica app, print the first result.

    Timed from ``Popen`` to the printed line; the extras are the script's own
    clock for the import, ``serve.run`` and the first call.
    """
    return _startup(ctx, "")


@scenario("startup_local_testing", "s", baseline="python_startup", better="lower", target=0.3)
def startup_local_testing(ctx: Context) -> dict[str, float]:
    """As ``startup_processes`` with ``_local_testing_mode=True`` (everything in one process)."""
    return _startup(ctx, ", _local_testing_mode=True")


MEMORY_SCRIPT = """\
import sys
from ladle import serve


@serve.deployment(num_replicas=2)
class Idle:
    def __call__(self):
        return "ok"


try:
    serve.run(Idle.bind(), name="idle")
    print("ready", flush=True)
    sys.stdin.read()  # the parent closes our stdin when it has measured
finally:
    serve.shutdown()
"""


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@scenario("memory_idle", "MB", baseline="python_idle_rss", better="lower", target=200.0)
def memory_idle(ctx: Context) -> dict[str, float]:
    """RSS summed over a fresh driver (with the controller) and its two idle replicas.

    Measured 1 s (0.3 s quick) after ``serve.run`` returned; extras give each
    process, the other processes the driver started (the HTTP proxy, which
    ``serve.run`` starts in the background by default), the RSS of all of
    them, and their PSS sum (shared pages split between the processes).
    """
    script = ctx.tmp_dir / "memory.py"
    script.write_text(MEMORY_SCRIPT)
    with hold([PYTHON, str(script)], stderr_path=ctx.tmp_dir / "stderr.txt", timeout_s=ctx.remaining_s()) as (
        driver, line, _
    ):
        if line != "ready":
            raise RuntimeError(f"expected 'ready', the driver printed {line!r}")
        time.sleep(0.3 if ctx.quick else 1.0)
        children = descendant_pids(driver)
        replicas = [pid for pid in children if " Idle" in _cmdline(pid) and "replica_main" in _cmdline(pid)]
        others = [pid for pid in children if pid not in replicas]
        if len(replicas) != 2:
            raise RuntimeError(f"expected 2 replica processes, found {len(replicas)}: "
                               f"{[_cmdline(pid) for pid in children]}")
        figure = {
            "value": rss_bytes([driver, *replicas]) / MB,
            "driver": rss_bytes([driver]) / MB,
            "replica_1": rss_bytes(replicas[:1]) / MB,
            "replica_2": rss_bytes(replicas[1:]) / MB,
            "others": rss_bytes(others) / MB,
            "n_others": len(others),
            "all": rss_bytes([driver, *children]) / MB,
            "pss_all": pss_bytes([driver, *children]) / MB,
        }
    return figure
