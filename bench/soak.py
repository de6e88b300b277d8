"""The bounded soak of issue 4: mixed traffic while replicas are SIGKILLed.

``python bench/run.py --only soak`` (not part of the default run: it takes
about 70 s; ``--quick`` about 15 s).  One ladle instance, its HTTP proxy on a
free port of 127.0.0.1, one application of two deployments with two replicas
each: ``Ingress`` (handle methods, a stream, and ``__call__`` for HTTP) and
``Adder`` (downstream of the composition); and a second application at
``/sync``, ``SyncEcho`` (two replicas, a sync ``__call__``: its HTTP answers
are written by worker threads, ``_serving/sync_http.py``).  For 60 s (12 s with ``--quick``)
the driver keeps a bounded number of callers busy, each one request at a
time:

- ``handle_sync``: threads calling ``handle.echo.remote(i).result()``;
- ``handle_async``: coroutines awaiting ``handle.echo.remote(i)``;
- ``compose``: coroutines awaiting ``handle.compose.remote(i)``, where the
  ingress awaits ``adder.add.remote(adder.add.remote(i))`` (a response passed
  as an argument);
- ``handle_stream``: a thread (``for``) and a coroutine (``async for``) each
  reading a 200-item stream per call;
- ``http``: httpx connections alternating ``GET /echo`` and ``GET /compose``;
- ``http_sync``: httpx connections calling ``GET /sync?x=i`` (``SyncEcho``);
- ``http_stream``: httpx connections reading a 200-chunk ``StreamingResponse``.

Every 10 s (3 s quick) one replica, picked at random among the deployments
with two or more replicas, gets SIGKILL.  An error is *accounted for* when it
is a replica death as the caller sees it (``ReplicaDiedError``, HTTP 503, or
a connection closed mid-response) and happens within 2 s after a kill; every
other error, including a wrong result or a call stuck past 10 s, is
unaccounted.  The figure is the number of problems: unaccounted errors,
leaked processes and file descriptors, kills not followed by a replacement,
and roles whose peak RSS in the last window is more than 20 % above the
first.  A full report goes to stderr; the extras hold the counts.
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness import Context, descendant_pids, scenario

HOST = "127.0.0.1"  # the only address the load goes to
STREAM_ITEMS = 200
CHUNK = b"x" * 16
KILL_WINDOW_S = 2.0  # an error this long after a kill is the kill's
CALL_TIMEOUT_S = 10.0  # a call taking longer counts as a hang
SLOW_S = 0.5  # calls served slower than this are listed with the time since the last kill
MAX_CALLS = 1_000_000  # per caller: the load is bounded in count as well as time
FLAT_RATIO = 1.2  # end-of-soak peak RSS within +20 % of the start's
MB = 1024 * 1024
# What a replica death looks like to a caller.
DEATH_ERRORS = frozenset({"ReplicaDiedError", "HTTP 503", "RemoteProtocolError", "ReadError"})

# Callers per kind: threads for the sync ones, coroutines for the others.
SYNC_CALLERS = {"handle_sync": 2, "handle_stream": 1}
ASYNC_CALLERS = {"handle_async": 6, "compose": 4, "handle_stream": 1, "http": 4, "http_sync": 2,
                 "http_stream": 2}


class WrongResult(Exception):
    pass


class HTTPStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def _error_name(exc: BaseException) -> str:
    if isinstance(exc, HTTPStatusError):
        return f"HTTP {exc.status}"
    return type(exc).__name__


# ----------------------------------------------------------------------------- the application


def soak_app() -> Any:
    """Two deployments, two replicas each; defined here so they travel by value."""
    from ladle import serve
    from ladle.handle import DeploymentHandle

    @serve.deployment(num_replicas=2)
    class Adder:
        def add(self, val: int) -> int:
            return val + 1

    @serve.deployment(num_replicas=2, max_ongoing_requests=16)
    class Ingress:
        def __init__(self, adder: DeploymentHandle) -> None:
            self._adder = adder

        async def echo(self, x: int) -> int:
            return x

        async def compose(self, x: int) -> int:
            return int(await self._adder.add.remote(self._adder.add.remote(x)))

        def items(self, n: int) -> Any:
            yield from range(n)

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import PlainTextResponse, StreamingResponse

            path, query = request.url.path, request.query_params
            if path == "/echo":
                return query["x"]
            if path == "/compose":
                return str(await self.compose(int(query["x"])))
            if path == "/stream":
                n = int(query["n"])

                async def chunks() -> Any:
                    for _ in range(n):
                        yield b"x" * 16

                return StreamingResponse(chunks(), media_type="application/octet-stream")
            return PlainTextResponse("not found", status_code=404)

    return Ingress.bind(Adder.bind())


def soak_sync_app() -> Any:
    """A plain deployment with a sync ``__call__`` (default ``max_ongoing_requests``)."""
    from ladle import serve

    @serve.deployment(num_replicas=2)
    class SyncEcho:
        def __call__(self, request: Any) -> str:
            return str(request.query_params["x"])

    return SyncEcho.bind()


# ----------------------------------------------------------------------------- bookkeeping


class Tally:
    """Calls served and errors (kind, error name, time, text) per kind; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.served: Counter[str] = Counter()
        self.slowest: dict[str, float] = defaultdict(float)
        self.errors: list[tuple[str, str, float, str]] = []
        self.slow: list[tuple[str, float, float]] = []  # (kind, start, seconds) of calls over SLOW_S
        self.stream_items = 0

    def ok(self, kind: str, t0: float, items: int = 0) -> None:
        took = time.monotonic() - t0
        with self.lock:
            self.served[kind] += 1
            self.stream_items += items
            self.slowest[kind] = max(self.slowest[kind], took)
            if took > SLOW_S:
                self.slow.append((kind, t0, took))

    def fail(self, kind: str, exc: BaseException, t0: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.errors.append((kind, _error_name(exc), now, str(exc).splitlines()[0][:160] if str(exc) else ""))
            self.slowest[kind] = max(self.slowest[kind], now - t0)


def _role(pid: int) -> str | None:
    """``proxy``, or the deployment name of a replica (argv ends with ``Name-<id>``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return None
    if not any(b"replica_main" in arg for arg in argv):
        return None
    name = argv[-1].decode(errors="replace")
    return "proxy" if name == "proxy" else name.rsplit("-", 1)[0]


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fds(pid: int | str = "self") -> list[str]:
    """Where each open fd of a process points (``/proc/PID/fd``)."""
    out = []
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{fd}"))
        except OSError:
            continue  # closed meanwhile (e.g. the fd listdir itself used)
    return out


class Sampler(threading.Thread):
    """RSS of the driver, the proxy and every replica every 0.5 s: (t, role, pid, bytes)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(name="soak-rss", daemon=True)
        self.stop = stop
        self.samples: list[tuple[float, str, int, int]] = []

    def sample(self) -> None:
        now = time.monotonic()
        self.samples.append((now, "driver", os.getpid(), _rss(os.getpid())))
        for pid in descendant_pids():
            role = _role(pid)
            if role is not None and (rss := _rss(pid)):
                self.samples.append((now, role, pid, rss))

    def run(self) -> None:
        while True:
            self.sample()
            if self.stop.wait(0.5):
                return

    def peak(self, t0: float, t1: float) -> dict[str, tuple[float, int]]:
        """Per role, the largest RSS (MB) of any of its processes in [t0, t1], and how many there were."""
        best: dict[str, float] = defaultdict(float)
        pids: dict[str, set[int]] = defaultdict(set)
        for t, role, pid, rss in self.samples:
            if t0 <= t <= t1:
                best[role] = max(best[role], rss / MB)
                pids[role].add(pid)
        return {role: (best[role], len(pids[role])) for role in best}


class Killer(threading.Thread):
    """SIGKILL one random replica of a deployment with >= 2 replicas at each kill time."""

    def __init__(self, stop: threading.Event, t_start: float, interval_s: float, n_kills: int,
                 rng: random.Random) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.stop, self.t_start, self.interval_s, self.n_kills, self.rng = stop, t_start, interval_s, n_kills, rng
        self.kills: list[tuple[float, str, int]] = []  # (time, replica id, pid)
        self.recovered_s: list[float] = []  # kill to the deployment's replicas all RUNNING again
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the scenario
            self.failure = exc

    def _run(self) -> None:
        from ladle._api.lifecycle import status_raw

        for k in range(1, self.n_kills + 1):
            if self.stop.wait(max(0.0, self.t_start + k * self.interval_s - time.monotonic())):
                return
            raw = status_raw()
            targets = {dep: info["target_num_replicas"]
                       for app in raw["applications"].values() for dep, info in app["deployments"].items()}
            candidates = [(rid, pid) for rid, pid in raw["pids"].items()
                          if rid != "proxy" and targets.get(rid.rsplit("-", 1)[0], 0) >= 2]
            if not candidates:
                raise RuntimeError(f"nothing to kill: {raw['pids']}")
            deployments = sorted({rid.rsplit("-", 1)[0] for rid, _ in candidates})
            victim_dep = self.rng.choice(deployments)
            rid, pid = self.rng.choice(sorted(c for c in candidates if c[0].rsplit("-", 1)[0] == victim_dep))
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            self.kills.append((t_kill, rid, pid))
            print(f"soak: t={t_kill - self.t_start:5.1f} s SIGKILL {rid} (pid {pid})", file=sys.stderr)
            self._wait_replaced(victim_dep, rid, t_kill, targets[victim_dep])

    def _wait_replaced(self, dep: str, rid: str, t_kill: float, target: int) -> None:
        from ladle._api.lifecycle import status_raw

        deadline = t_kill + self.interval_s - 0.5
        while time.monotonic() < deadline:
            raw = status_raw()
            running = sum(info["replica_states"].get("RUNNING", 0)
                          for app in raw["applications"].values()
                          for name, info in app["deployments"].items() if name == dep)
            if running >= target and rid not in raw["pids"]:
                self.recovered_s.append(time.monotonic() - t_kill)
                return
            if self.stop.wait(0.05):
                return


# ----------------------------------------------------------------------------- callers


def _sync_caller(kind: str, call: Callable[[int], int], stop_at: float, tally: Tally) -> None:
    for i in range(MAX_CALLS):
        if time.monotonic() >= stop_at:
            return
        t0 = time.monotonic()
        try:
            items = call(i)
        except Exception as exc:
            tally.fail(kind, exc, t0)
            time.sleep(0.05)  # pacing, so a broken path can't spin
        else:
            tally.ok(kind, t0, items)


async def _async_caller(kind: str, call: Callable[[int], Awaitable[int]], stop_at: float, tally: Tally) -> None:
    for i in range(MAX_CALLS):
        if time.monotonic() >= stop_at:
            return
        t0 = time.monotonic()
        try:
            items = await asyncio.wait_for(call(i), CALL_TIMEOUT_S)
        except Exception as exc:
            tally.fail(kind, exc, t0)
            await asyncio.sleep(0.05)
        else:
            tally.ok(kind, t0, items)


def _check(got: Any, want: Any) -> None:
    if got != want:
        raise WrongResult(f"got {got!r}, expected {want!r}")


def sync_calls(handle: Any) -> dict[str, Callable[[int], int]]:
    stream = handle.options(stream=True).items

    def echo(i: int) -> int:
        _check(handle.echo.remote(i).result(timeout_s=CALL_TIMEOUT_S), i)
        return 0

    def items(i: int) -> int:
        got = list(stream.remote(STREAM_ITEMS))  # each item bounded by the replica's death or the stream's end
        _check(got, list(range(STREAM_ITEMS)))
        return len(got)

    return {"handle_sync": echo, "handle_stream": items}


def async_calls(handle: Any, client: Any, url: str) -> dict[str, Callable[[int], Awaitable[int]]]:
    stream = handle.options(stream=True).items

    async def echo(i: int) -> int:
        _check(await handle.echo.remote(i), i)
        return 0

    async def compose(i: int) -> int:
        _check(await handle.compose.remote(i), i + 2)
        return 0

    async def items(i: int) -> int:
        got = [x async for x in stream.remote(STREAM_ITEMS)]
        _check(got, list(range(STREAM_ITEMS)))
        return len(got)

    async def http(i: int) -> int:
        path, want = (f"echo?x={i}", str(i)) if i % 2 else (f"compose?x={i}", str(i + 2))
        r = await client.get(url + path)
        if r.status_code != 200:
            raise HTTPStatusError(r.status_code)
        _check(r.text, want)
        return 0

    async def http_sync(i: int) -> int:
        r = await client.get(f"{url}sync", params={"x": i})
        if r.status_code != 200:
            raise HTTPStatusError(r.status_code)
        _check(r.text, str(i))
        return 0

    async def http_stream(i: int) -> int:
        async with client.stream("GET", f"{url}stream?n={STREAM_ITEMS}") as r:
            if r.status_code != 200:
                raise HTTPStatusError(r.status_code)
            size = 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
        _check(size, STREAM_ITEMS * len(CHUNK))
        return STREAM_ITEMS

    return {"handle_async": echo, "compose": compose, "handle_stream": items, "http": http,
            "http_sync": http_sync, "http_stream": http_stream}


async def _warm_up(calls: dict[str, Callable[[int], Awaitable[int]]]) -> None:
    """One call of each async kind, a few times, so every process has its code paths loaded."""
    for i in range(4):
        for call in calls.values():
            await asyncio.wait_for(call(i), CALL_TIMEOUT_S)


# ----------------------------------------------------------------------------- the scenario


def _window_errors(errors: list[tuple[str, str, float, str]], kills: list[tuple[float, str, int]]
                   ) -> tuple[list[tuple[str, str, float, str]], float]:
    """The errors not accounted for by a kill, and the longest kill-to-error delay among those that are."""
    unaccounted, lag = [], 0.0
    for err in errors:
        _, name, t, _ = err
        after = [t - tk for tk, _, _ in kills if 0.0 <= t - tk <= KILL_WINDOW_S]
        if name in DEATH_ERRORS and after:
            lag = max(lag, min(after))
        else:
            unaccounted.append(err)
    return unaccounted, lag


@scenario("soak", "problems", better="lower", target=1.0, timeout_s=150.0, default=False)
def soak(ctx: Context) -> dict[str, float]:
    """Issue 4's soak: 60 s of mixed traffic, a replica SIGKILLed every 10 s; counts what went wrong."""
    import httpx
    import uvloop

    from ladle import serve
    from ladle._api.lifecycle import http_port, status_raw

    duration_s = ctx.scale(60, 12)
    interval_s = ctx.scale(10, 3)
    n_kills = (duration_s - 1) // interval_s  # 5 (at 10, 20, .. 50 s); quick: 3
    seed = int(os.environ.get("LADLE_SOAK_SEED", random.SystemRandom().randrange(1 << 30)))
    log = sys.stderr

    # What a first instance creates once per process and keeps (ladle's background
    # loop: epoll, io_uring, wake-up pipes, eventfd, and libuv's spare /dev/null fd)
    # is not a leak: count the fds before any instance, then after a first one, and
    # compare the soak's instance against the latter.
    fds_cold = _fds()
    serve.start(http_options={"host": HOST, "port": 0})
    serve.shutdown()
    gc.collect()
    fds_before = _fds()
    threads_before = threading.active_count()
    tally = Tally()
    stop = threading.Event()
    sampler = Sampler(stop)
    killer: Killer | None = None
    threads: list[threading.Thread] = []
    report: dict[str, float] = {}
    try:
        serve.start(http_options={"host": HOST, "port": 0})
        handle = serve.run(soak_app(), name="soak", route_prefix="/")
        serve.run(soak_sync_app(), name="soak_sync", route_prefix="/sync")
        url = f"http://{HOST}:{http_port()}/"
        proxy_pid = status_raw()["pids"]["proxy"]
        n_conns = ASYNC_CALLERS["http"] + ASYNC_CALLERS["http_sync"] + ASYNC_CALLERS["http_stream"]

        async def drive() -> tuple[int, float]:
            limits = httpx.Limits(max_connections=n_conns, max_keepalive_connections=n_conns)
            async with httpx.AsyncClient(limits=limits, timeout=CALL_TIMEOUT_S) as client:
                calls = async_calls(handle, client, url)
                await _warm_up(calls)
                for call in sync_calls(handle).values():
                    await asyncio.to_thread(call, 0)
                proxy_fds_start = len(_fds(proxy_pid))
                nonlocal killer
                t_start = time.monotonic()
                stop_at = t_start + duration_s
                sampler.start()
                killer = Killer(stop, t_start, interval_s, n_kills, random.Random(seed))
                killer.start()
                for kind, n in SYNC_CALLERS.items():
                    call_fn = sync_calls(handle)[kind]
                    for j in range(n):
                        t = threading.Thread(target=_sync_caller, args=(kind, call_fn, stop_at, tally),
                                             name=f"soak-{kind}-{j}", daemon=True)
                        t.start()
                        threads.append(t)
                tasks = [asyncio.ensure_future(_async_caller(kind, calls[kind], stop_at, tally))
                         for kind, n in ASYNC_CALLERS.items() for _ in range(n)]
                await asyncio.gather(*tasks)
                # The sync callers end by themselves too (each call is bounded by CALL_TIMEOUT_S).
                for t in threads:
                    await asyncio.to_thread(t.join, CALL_TIMEOUT_S + 5)
                stuck = [t.name for t in threads if t.is_alive()]
                if stuck:
                    raise RuntimeError(f"sync callers still running past the soak: {stuck}")
                return proxy_fds_start, t_start

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            proxy_fds_start, t_start = runner.run(drive())
        t_end = time.monotonic()
        stop.set()
        assert killer is not None
        killer.join(10)
        sampler.join(5)
        if killer.failure is not None:
            raise RuntimeError(f"the killer failed: {killer.failure!r}") from killer.failure
        sampler.sample()
        # Keep-alive connections are closed by now; the proxy lets go of them at once.
        deadline = time.monotonic() + 5
        while (proxy_fds_end := len(_fds(proxy_pid))) > proxy_fds_start and time.monotonic() < deadline:
            time.sleep(0.1)
        proxy_alive = proxy_pid == status_raw()["pids"].get("proxy")
    finally:
        stop.set()
        serve.shutdown()
    leaked = descendant_pids()
    gc.collect()
    fds_after = _fds()
    extra_fds = list((Counter(fds_after) - Counter(fds_before)).elements())

    # ------------------------------------------------------------------ the report
    unaccounted, lag = _window_errors(tally.errors, killer.kills)
    kinds = sorted({*SYNC_CALLERS, *ASYNC_CALLERS})
    by_kind: dict[str, Counter[str]] = {k: Counter() for k in kinds}
    for kind, name, _, _ in tally.errors:
        by_kind[kind][name] += 1
    first = sampler.peak(t_start, t_start + interval_s)
    last = sampler.peak(t_end - interval_s, t_end + 1)
    not_flat = [role for role in first if role in last and last[role][0] > FLAT_RATIO * first[role][0]]

    print(f"\nsoak: {duration_s} s, seed {seed}, {len(killer.kills)} kills "
          f"({', '.join(rid for _, rid, _ in killer.kills)}), "
          f"replaced {len(killer.recovered_s)} (slowest {max(killer.recovered_s, default=0):.2f} s)", file=log)
    print(f"{'kind':14} {'served':>8} {'errors':>7} {'slowest_s':>9}  error types", file=log)
    for k in kinds:
        types = ", ".join(f"{n} x{c}" for n, c in by_kind[k].most_common()) or "-"
        print(f"{k:14} {tally.served[k]:8} {sum(by_kind[k].values()):7} {tally.slowest[k]:9.2f}  {types}", file=log)
    print(f"errors: {len(tally.errors)}, accounted for by kills {len(tally.errors) - len(unaccounted)} "
          f"(latest {lag:.2f} s after its kill), unaccounted {len(unaccounted)}", file=log)
    for kind, name, t, text in unaccounted[:20]:
        print(f"  unaccounted: t={t - t_start:6.2f} s {kind} {name}: {text}", file=log)
    if tally.slow:
        near = [x for x in tally.slow
                if any(tk - x[2] <= x[1] <= tk + KILL_WINDOW_S for tk, _, _ in killer.kills)]
        kind, t0, took = max(tally.slow, key=lambda x: x[2])
        print(f"calls served in over {SLOW_S} s: {len(tally.slow)}, {len(near)} of them running within "
              f"{KILL_WINDOW_S:g} s of a kill; slowest: {kind} at t={t0 - t_start:.2f} s took {took:.2f} s",
              file=log)
    print(f"{'role':8} {'start_MB':>8} {'end_MB':>8} {'processes':>9}", file=log)
    for role in sorted(first):
        end = last.get(role, (float("nan"), 0))
        print(f"{role:8} {first[role][0]:8.1f} {end[0]:8.1f} {first[role][1]:4} -> {end[1]}"
              f"{'  GREW' if role in not_flat else ''}", file=log)
    print(f"leaked processes {len(leaked)}; driver fds {len(fds_cold)} before any instance, {len(fds_before)} "
          f"after a first one, {len(fds_after)} after the soak's "
          f"(extra: {extra_fds}); proxy fds {proxy_fds_start} -> {proxy_fds_end}"
          f"{'' if proxy_alive else ' (the proxy was restarted!)'}; driver threads {threads_before} -> "
          f"{threading.active_count()}", file=log)

    problems = (len(unaccounted) + len(leaked) + len(extra_fds) + max(0, proxy_fds_end - proxy_fds_start)
                + (len(killer.kills) - len(killer.recovered_s)) + len(not_flat) + (not proxy_alive))
    report["value"] = problems
    report["kills"] = len(killer.kills)
    report["replaced"] = len(killer.recovered_s)
    report["max_recovery_s"] = max(killer.recovered_s, default=0.0)
    for k in kinds:
        report[f"served_{k}"] = tally.served[k]
        report[f"errors_{k}"] = sum(by_kind[k].values())
    report["stream_items"] = tally.stream_items
    report["slow_calls"] = len(tally.slow)
    report["unaccounted"] = len(unaccounted)
    report["max_error_lag_s"] = lag
    for role in sorted(first):
        report[f"rss_{role}_start_mb"] = first[role][0]
        report[f"rss_{role}_end_mb"] = last.get(role, (0.0, 0))[0]
    report["leaked_procs"] = len(leaked)
    report["driver_fds_cold"] = len(fds_cold)
    report["driver_fds_before"] = len(fds_before)
    report["driver_fds_after"] = len(fds_after)
    report["proxy_fds_start"] = proxy_fds_start
    report["proxy_fds_end"] = proxy_fds_end
    return report


# ------------------------------------------------------- the controller dies (issue 11)


@scenario("soak_controller", "failed", better="lower", target=1.0, timeout_s=150.0, default=False)
def soak_controller(ctx: Context) -> dict[str, float]:
    """Issue 11: steady handle and HTTP traffic into a long-lived instance (`ladle start`)
    while its controller is SIGKILLed every few seconds.  The figure is the number of
    failed requests (target 0); the extras say how long after each kill a deploy worked
    again (target under 1 s) and whether any replica was restarted (it must not be)."""
    import json
    import subprocess

    import httpx
    import uvloop

    run_dir = ctx.tmp_dir / "run"
    os.environ["LADLE_RUN_DIR"] = str(run_dir)  # before ladle reads its settings
    from ladle import serve
    from ladle._api.lifecycle import status_raw

    duration_s = ctx.scale(30, 10)
    interval_s = ctx.scale(5, 3)
    n_kills = (duration_s - 1) // interval_s
    log = sys.stderr
    subprocess.run([sys.executable, "-m", "ladle", "start", "--http-port", "0",
                    "--dashboard-port", "0"], check=True, timeout=60, stdout=subprocess.DEVNULL)
    info_path = run_dir / "instance" / "instance.json"
    info = json.loads(info_path.read_text())
    tally = Tally()
    redeploy_s: list[float] = []
    restarted_replicas = 0
    try:
        app = soak_app()
        handle = serve.run(app, name="soak", route_prefix="/")
        url = f"http://{HOST}:{info['http_port']}/"
        pids_before = {k: v for k, v in status_raw()["pids"].items()}
        stop = threading.Event()

        def kill_controllers(t_start: float) -> None:
            nonlocal restarted_replicas
            for k in range(1, n_kills + 1):
                if stop.wait(max(0.0, t_start + k * interval_s - time.monotonic())):
                    return
                pid = json.loads(info_path.read_text())["controller_pid"]
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                serve.run(app, name="soak", route_prefix="/")  # the same app: nothing restarts
                redeploy_s.append(time.monotonic() - t_kill)
                print(f"soak_controller: t={t_kill - t_start:5.1f} s SIGKILL controller "
                      f"(pid {pid}); a deploy worked again after {redeploy_s[-1]:.3f} s",
                      file=log)
                now = status_raw()["pids"]
                restarted_replicas += sum(1 for name, p in pids_before.items()
                                          if now.get(name) != p)

        async def drive() -> None:
            n = ASYNC_CALLERS["http"] + ASYNC_CALLERS["http_stream"]
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            async with httpx.AsyncClient(limits=limits, timeout=CALL_TIMEOUT_S) as client:
                calls = async_calls(handle, client, url)
                kinds = ("handle_async", "compose", "handle_stream", "http", "http_stream")
                await _warm_up({k: calls[k] for k in kinds})
                t_start = time.monotonic()
                stop_at = t_start + duration_s
                killer = threading.Thread(target=kill_controllers, args=(t_start,), daemon=True)
                killer.start()
                sync = sync_calls(handle)
                threads = [threading.Thread(target=_sync_caller,
                                            args=("handle_sync", sync["handle_sync"], stop_at,
                                                  tally), daemon=True) for _ in range(2)]
                for t in threads:
                    t.start()
                await asyncio.gather(*(_async_caller(kind, calls[kind], stop_at, tally)
                                       for kind in kinds for _ in range(ASYNC_CALLERS[kind])))
                for t in threads:
                    await asyncio.to_thread(t.join, CALL_TIMEOUT_S + 5)
                stop.set()
                await asyncio.to_thread(killer.join, 30)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(drive())
    finally:
        serve.shutdown()
    served = sum(tally.served.values())
    print(f"soak_controller: {duration_s} s, {len(redeploy_s)} controller kills, {served} "
          f"calls served, {len(tally.errors)} failed, replicas restarted {restarted_replicas}; "
          f"deploys worked again after {', '.join(f'{s:.3f}' for s in redeploy_s)} s",
          file=log)
    for kind, name, t, text in tally.errors[:20]:
        print(f"  failed: {kind} {name}: {text}", file=log)
    return {"value": len(tally.errors), "kills": len(redeploy_s), "served": served,
            "max_redeploy_s": max(redeploy_s, default=float("nan")),
            "replicas_restarted": restarted_replicas,
            **{f"served_{k}": v for k, v in tally.served.items()}}
