"""Graceful shutdown: stop accepting, let in-flight requests finish (to a deadline), then stop.

Through ``serve.shutdown()`` and through SIGTERM / Ctrl-C on ``ladle run``.
A held request records that it started and finishes once a release file
exists, so the test decides when it ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ladle import serve
from ladle.exceptions import HandleClosedError, ReplicaDiedError
from tests.conftest import gone, lines, replica_pids, wait_for


def refused(url: str) -> bool:
    """The server takes no new request: it refuses the connection, or closes it unanswered."""
    try:
        httpx.get(url, timeout=10)
    except (httpx.ConnectError, httpx.RemoteProtocolError):
        return True
    return False


@serve.deployment(graceful_shutdown_timeout_s=10)
class Held:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    async def hold(self, tag: str) -> str:
        with open(os.path.join(self.state_dir, "started"), "a") as f:
            f.write(f"{tag}\n")
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(self.state_dir, "release")):
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            await asyncio.sleep(0.01)
        return tag

    async def __call__(self, request: Any) -> str:
        return await self.hold(request.query_params["tag"])


def test_shutdown_lets_in_flight_requests_finish(http_url: str, tmp_path: Path) -> None:
    handle = serve.run(Held.bind(str(tmp_path)), name="held", route_prefix="/held")
    pids = replica_pids()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        by_handle = handle.hold.remote("handle")
        by_http = pool.submit(httpx.get, f"{http_url}/held", params={"tag": "http"}, timeout=30)
        wait_for(lambda: sorted(lines(tmp_path / "started")) == ["handle", "http"],
                 message="both requests to start")

        shutting_down = pool.submit(serve.shutdown)
        # New requests are refused at once, over HTTP and through handles ...
        wait_for(lambda: refused(f"{http_url}/held"), message="the proxy to stop accepting")
        with pytest.raises(HandleClosedError):
            handle.hold.remote("late").result(timeout_s=10)
        # ... while the requests in flight are still being served.
        assert not shutting_down.done()
        assert not any(gone(pid) for pid in pids)

        (tmp_path / "release").touch()
        assert by_handle.result(timeout_s=10) == "handle"
        response = by_http.result(10)
        assert (response.status_code, response.text) == (200, "http")
        shutting_down.result(30)
        assert all(gone(pid) for pid in pids)
        assert "late" not in lines(tmp_path / "started")
    finally:
        pool.shutdown()


@serve.deployment(graceful_shutdown_timeout_s=0.5)
class Endless:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir

    async def __call__(self, arg: Any = None) -> None:
        with open(os.path.join(self.state_dir, "started"), "a") as f:
            f.write("started\n")
        await asyncio.Event().wait()


def test_shutdown_cuts_requests_that_outlive_the_timeout(http_url: str, tmp_path: Path) -> None:
    handle = serve.run(Endless.bind(str(tmp_path)), name="endless", route_prefix="/endless")
    pids = replica_pids()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        by_handle = handle.remote()
        by_http = pool.submit(httpx.get, f"{http_url}/endless", timeout=30)
        wait_for(lambda: len(lines(tmp_path / "started")) == 2, message="both requests to start")
        serve.shutdown()  # drains for 0.5 s, then stops the replica
        assert all(gone(pid) for pid in pids)
        with pytest.raises(ReplicaDiedError):
            by_handle.result(timeout_s=10)
        try:
            response = by_http.result(10)
        except httpx.TransportError:
            pass  # the connection was closed: the request was cut
        else:
            assert response.status_code >= 500
    finally:
        pool.shutdown()


APP = textwrap.dedent('''
    import asyncio, os, time

    from ladle import serve

    @serve.deployment(graceful_shutdown_timeout_s=10)
    class Held:
        def __init__(self, state_dir: str) -> None:
            self.state_dir = state_dir

        async def __call__(self, request) -> str:
            with open(os.path.join(self.state_dir, "started"), "a") as f:
                f.write("started\\n")
            deadline = time.monotonic() + 30
            while not os.path.exists(os.path.join(self.state_dir, "release")):
                if time.monotonic() > deadline:
                    raise TimeoutError("never released")
                await asyncio.sleep(0.01)
            return "finished"

    app = Held.bind(os.environ["HELD_STATE_DIR"])
''')


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ladle-rel-"))  # short: Unix socket paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_ladle_run_finishes_in_flight_requests_on_signal(tmp_path: Path, run_dir: Path,
                                                         signum: int) -> None:
    (tmp_path / "held_app.py").write_text(APP)
    env = dict(os.environ, LADLE_RUN_DIR=str(run_dir), HELD_STATE_DIR=str(tmp_path))
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ladle", "run", "held_app:app", "--port", "0",
             "--app-dir", str(tmp_path)], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    children: list[int] = []
    try:
        def ready_port() -> int | None:
            assert proc.poll() is None, stderr_path.read_text()
            found = re.search(r"is ready at http://127\.0\.0\.1:(\d+)/", stderr_path.read_text())
            return int(found.group(1)) if found else None

        port = wait_for(ready_port, timeout_s=30, message="`ladle run` to be ready")
        url = f"http://127.0.0.1:{port}/"
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        in_flight = pool.submit(httpx.get, url, timeout=30)
        wait_for(lambda: lines(tmp_path / "started") == ["started"], message="a request in flight")

        proc.send_signal(signum)
        wait_for(lambda: refused(url), message="`ladle run` to stop accepting")
        assert proc.poll() is None  # still draining the request in flight
        (tmp_path / "release").touch()
        response = in_flight.result(10)
        assert (response.status_code, response.text) == (200, "finished")
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: all(gone(pid) for pid in children), message="the replica and proxy to exit")
        assert lines(tmp_path / "started") == ["started"]
    finally:
        pool.shutdown(wait=False)
        if proc.poll() is None:
            for pid in children:
                try:
                    psutil.Process(pid).kill()
                except psutil.Error:
                    pass
            proc.kill()
            proc.wait()
