"""Ray Serve measured in the same run as ladle: each ``ray_*`` row has ladle's counterpart as its baseline.

Never in the default run: ``python bench/run.py --only 'ray_*'``.  Ray is no
dependency of ladle and is never imported here: each scenario runs
``ray_driver.py`` under Ray's own interpreter (``LADLE_BENCH_RAY_PYTHON``,
default ``/work/venvs/ray/bin/python`` or ``/tmp/rayvenv/bin/python``; without
one the rows say "skipped").
The driver runs the ladle scenario function itself with ``ladle.serve`` bound
to ``ray.serve``, so the app and timing code are the same.  It leads a new
session; at its end anything left of that session, or naming its private Ray
temp dir (raylet, gcs_server, workers), is killed by pid and counted.
The rows are ``versus`` rows: the ratio reads "ladle is N times better".
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ceilings import STARTUP_RUNS
from harness import Context, Skip, scenario
from scenarios_http import WRK_MISSING

BENCH_DIR = Path(__file__).resolve().parent
DRIVER = BENCH_DIR / "ray_driver.py"
# Where Ray's interpreter is looked for when LADLE_BENCH_RAY_PYTHON is unset: the first that exists.
DEFAULT_RAY_PYTHONS = ("/work/venvs/ray/bin/python", "/tmp/rayvenv/bin/python")
DEFAULT_RAY_PYTHON = next((p for p in DEFAULT_RAY_PYTHONS if os.access(p, os.X_OK)), DEFAULT_RAY_PYTHONS[-1])
SHUTDOWN_S = 60.0  # for serve.shutdown + ray.shutdown, on top of the measurement
SETTLE_S = 5.0  # for Ray's processes to exit by themselves once the driver has


def ray_env() -> dict[str, str]:
    """The driver's environment: this directory importable, ladle's src not; a new cluster, no usage stats."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(BENCH_DIR), "RAY_USAGE_STATS_ENABLED": "0"}


def ray_python() -> str:
    """Ray's interpreter; ``Skip`` if there is none by default, an error if the configured one is broken."""
    configured = os.environ.get("LADLE_BENCH_RAY_PYTHON")
    exe = configured or DEFAULT_RAY_PYTHON
    fail = RuntimeError if configured else Skip
    if not os.access(exe, os.X_OK):
        if configured:
            raise RuntimeError(f"LADLE_BENCH_RAY_PYTHON={configured} is not an executable")
        raise Skip(f"no Ray venv ({' or '.join(DEFAULT_RAY_PYTHONS)}): set LADLE_BENCH_RAY_PYTHON "
                   "to a Python with ray[serve] 2.x")
    probe = subprocess.run([exe, "-c", "import ray, ray.serve; print(ray.__version__)"], capture_output=True,
                           text=True, timeout=120, env=ray_env(), stdin=subprocess.DEVNULL)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise fail(f"{exe} cannot import ray.serve: {last}")
    version = probe.stdout.strip()
    if not version.startswith("2."):
        raise fail(f"{exe} has Ray {version}; these scenarios are for Ray Serve 2.x")
    print(f"bench: Ray {version} ({exe})", file=sys.stderr)
    return exe


def _session_pids(sid: int, marker: str) -> list[int]:
    """Live processes of session ``sid``, or whose command line names ``marker`` (our Ray temp dir)."""
    found = []
    needle = marker.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if state not in ("Z", "X") and (int(session) == sid or needle in cmdline):
            found.append(int(entry.name))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _wait_gone(sid: int, marker: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _session_pids(sid, marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])


class RaySession:
    """One driver process leading its own session, and the cleanup of everything Ray started from it."""

    def __init__(self, argv: list[str], ray_dir: Path, stdout: IO[bytes] | int, stderr: IO[bytes]) -> None:
        self.marker = str(ray_dir)
        self.leftovers: list[str] = []  # what was still running after the driver ended, then killed
        self.proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, env=ray_env(), cwd=BENCH_DIR)

    def stop(self) -> None:
        """Kill the driver if it runs, give Ray's processes ``SETTLE_S`` to exit, then kill them by pid."""
        sid = self.proc.pid
        if self.proc.poll() is None:
            os.killpg(sid, signal.SIGKILL)  # the driver is alive, so its group is still ours
        self.proc.wait()
        left = _wait_gone(sid, self.marker, SETTLE_S)
        if left:
            self.leftovers = [f"{_comm(pid)}[{pid}]" for pid in left]
            print(f"bench: Ray left {', '.join(self.leftovers)} running; killing them", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(sid, signal.SIGKILL)  # a member is alive, so the group id is not reused
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if still := _wait_gone(sid, self.marker, SETTLE_S):
            raise RuntimeError(f"Ray processes survived SIGKILL: {[f'{_comm(p)}[{p}]' for p in still]}")


@contextlib.contextmanager
def ray_session(argv: list[str], ray_dir: Path, stdout: IO[bytes] | int,
                stderr: IO[bytes]) -> Iterator[RaySession]:
    session = RaySession(argv, ray_dir, stdout, stderr)
    try:
        yield session
    finally:
        session.stop()


def run_on_ray(ctx: Context, name: str) -> dict[str, float]:
    """Run the ladle scenario behind ``name`` on Ray Serve in ``ray_driver.py``; its figure."""
    exe = ray_python()
    result, log = ctx.tmp_dir / "ray-result.json", ctx.tmp_dir / "ray-driver.log"
    budget_s = ctx.remaining_s() - 2 * SETTLE_S - 5
    argv = [exe, str(DRIVER), "run", name, "--result", str(result), "--tmp", str(ctx.tmp_dir),
            "--seconds", f"{budget_s - SHUTDOWN_S:.0f}", *(["--quick"] if ctx.quick else [])]
    with open(log, "wb") as out, ray_session(argv, ctx.tmp_dir / "ray", out, out) as session:
        try:
            rc = session.proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"Ray driver still running after {budget_s:.0f} s: {_log_tail(log)}") from None
    if not result.exists():
        raise RuntimeError(f"Ray driver exited with code {rc} and no result: {_log_tail(log)}")
    reply = json.loads(result.read_text())
    if "error" in reply:
        raise RuntimeError(f"on Ray {reply.get('ray_version', '')}: {reply['error']}")
    return {**reply["figure"], "leftover_procs": len(session.leftovers)}


def _startup_once(ctx: Context, exe: str) -> tuple[float, str, int]:
    """One fresh ``ray_driver.py startup``: seconds from Popen to its result line, the line, leftovers."""
    lines: queue.Queue[bytes] = queue.Queue()

    def pump(stream: IO[bytes]) -> None:  # drains stdout to EOF, so the driver never blocks on it
        for line in stream:
            lines.put(line)

    argv = [exe, str(DRIVER), "startup", "--tmp", str(ctx.tmp_dir)]
    log = ctx.tmp_dir / "ray-startup.log"
    deadline = time.monotonic() + ctx.remaining_s() - 2 * SETTLE_S - 5
    with open(log, "ab") as err:
        t0 = time.perf_counter()
        with ray_session(argv, ctx.tmp_dir / "ray", subprocess.PIPE, err) as session:
            assert session.proc.stdout is not None
            threading.Thread(target=pump, args=(session.proc.stdout,), daemon=True).start()
            while True:
                try:
                    line = lines.get(timeout=0.5).decode(errors="replace")
                except queue.Empty:
                    if session.proc.poll() is not None and lines.empty():
                        raise ChildProcessError(f"Ray startup script exited with code {session.proc.returncode} "
                                                f"before its result: {_log_tail(log)}") from None
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no result from the Ray startup script: {_log_tail(log)}") from None
                    continue
                if line.startswith("2 "):
                    elapsed = time.perf_counter() - t0
                    break
            try:
                rc = session.proc.wait(timeout=max(0.001, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"Ray startup script did not finish: {_log_tail(log)}") from None
        if rc != 0:
            raise RuntimeError(f"Ray startup script exited with code {rc}: {_log_tail(log)}")
    return elapsed, line, len(session.leftovers)


# ----------------------------------------------------------------------------- scenarios

_TIMEOUT_S = 300.0  # Ray's calls take milliseconds here: 44,000 sequential ones in ray_sync_latency


@scenario("ray_sync_latency", "µs", baseline="handle_sync_latency", better="lower", timeout_s=_TIMEOUT_S,
          default=False, versus=True)
def ray_sync_latency(ctx: Context) -> dict[str, float]:
    """``handle_sync_latency`` on Ray Serve: sequential ``handle.remote(i).result()``, p50/p99."""
    return run_on_ray(ctx, "ray_sync_latency")


@scenario("ray_async_throughput", "msg/s", baseline="handle_async_throughput", better="higher",
          timeout_s=120.0, default=False, versus=True)
def ray_async_throughput(ctx: Context) -> dict[str, float]:
    """``handle_async_throughput`` on Ray Serve: 1000 callers awaiting, ``max_ongoing_requests=1000``."""
    return run_on_ray(ctx, "ray_async_throughput")


@scenario("ray_composition_latency", "µs", baseline="composition_latency", better="lower", timeout_s=_TIMEOUT_S,
          default=False, versus=True)
def ray_composition_latency(ctx: Context) -> dict[str, float]:
    """``composition_latency`` on Ray Serve: Caller awaits ``adder.add.remote(adder.add.remote(x))``."""
    return run_on_ray(ctx, "ray_composition_latency")


@scenario("ray_stream_items", "items/s", baseline="handle_stream_items", better="higher", timeout_s=120.0,
          default=False, versus=True)
def ray_stream_items(ctx: Context) -> dict[str, float]:
    """``handle_stream_items`` on Ray Serve: ``for`` over a 20,000-int sync generator stream."""
    return run_on_ray(ctx, "ray_stream_items")


@scenario("ray_startup", "s", baseline="startup_processes", better="lower", timeout_s=240.0, default=False,
          versus=True)
def ray_startup(ctx: Context) -> dict[str, float]:
    """``startup_processes`` on Ray: a fresh script imports Ray, ``ray.init``s, ``serve.run``s, calls once.

    Popen to the printed result; median of 5 (2 quick) after one untimed run,
    as for ladle.  Extras: the script's own clock for each step.
    """
    exe = ray_python()
    runs = ctx.scale(*STARTUP_RUNS)
    times: list[float] = []
    extras: dict[str, list[float]] = {}
    leftovers = 0
    for i in range(runs + 1):
        elapsed, line, left = _startup_once(ctx, exe)
        leftovers += left
        if i == 0:
            continue
        times.append(elapsed)
        for key, _, value in (pair.partition("=") for pair in line.split()[1:]):
            extras.setdefault(key, []).append(float(value))
    return {"value": statistics.median(times), "best": min(times), "worst": max(times), "n": runs,
            **{key: statistics.median(values) for key, values in extras.items()}, "leftover_procs": leftovers}


@scenario("ray_http_64", "req/s", baseline="http_ladle_64", better="higher", timeout_s=120.0, default=False,
          versus=True)
def ray_http_64(ctx: Context) -> dict[str, float]:
    """``http_ladle_64`` on Ray Serve: the same deployment behind Ray's proxy, ``wrk -t2 -c64``.

    Extra ``server_cpu_us``: CPU per request of every Ray process (proxy,
    replica, controller, raylet, gcs, agents).
    """
    if shutil.which("wrk") is None:
        raise Skip(WRK_MISSING)
    return run_on_ray(ctx, "ray_http_64")


@scenario("ray_http_1", "µs", baseline="http_ladle_1", better="lower", timeout_s=120.0, default=False,
          versus=True)
def ray_http_1(ctx: Context) -> dict[str, float]:
    """``http_ladle_1`` on Ray Serve: one connection, requests back to back, p50/p99 (``wrk -t1 -c1``)."""
    if shutil.which("wrk") is None:
        raise Skip(WRK_MISSING)
    return run_on_ray(ctx, "ray_http_1")


@scenario("ray_gather_default_loop", "msg/s", baseline="handle_gather_default_loop", better="higher",
          timeout_s=_TIMEOUT_S, default=False, versus=True)
def ray_gather_default_loop(ctx: Context) -> dict[str, float]:
    """``handle_gather_default_loop`` on Ray Serve: ``gather`` of 5,000 calls, standard loop."""
    return run_on_ray(ctx, "ray_gather_default_loop")


def _register_payload(size: str) -> None:
    @scenario(f"ray_payload_oneway_{size}", "ms", baseline=f"payload_oneway_{size}", better="lower",
              timeout_s=_TIMEOUT_S, default=False, versus=True)
    def oneway(ctx: Context) -> dict[str, float]:
        """``payload_oneway_*`` on Ray Serve: a NumPy array one way, an int back."""
        return run_on_ray(ctx, f"ray_payload_oneway_{size}")


for _size in ("1mib", "10mib", "100mib"):
    _register_payload(_size)
