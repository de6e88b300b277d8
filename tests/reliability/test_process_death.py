"""The proxy process killed (restarted on its port), the owning process killed (nothing survives)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import psutil

from ladle import serve
from ladle._api.lifecycle import http_port
from tests.conftest import gone, read_line_within, wait_for


def proxy_pid() -> int | None:
    """The live proxy process this test process started, if any."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[-1:] == ["proxy"] and proc.status() != psutil.STATUS_ZOMBIE:
                return proc.pid
        except psutil.Error:
            pass
    return None


@serve.deployment
class Echo:
    def __call__(self, request: object = None) -> str:
        return "echo"


def test_killed_proxy_is_restarted_on_the_same_port(http_url: str) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    port = http_port()
    assert httpx.get(f"{http_url}/echo", timeout=10).text == "echo"

    def answers() -> bool:
        try:
            response = httpx.get(f"{http_url}/echo", timeout=10)
        except httpx.TransportError:
            return False  # not listening again yet
        return response.status_code == 200 and response.text == "echo"

    for _ in range(2):  # the restarted proxy is watched as the first one was
        pid = proxy_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: gone(pid), message="the proxy to die")
        wait_for(lambda: proxy_pid() not in (None, pid) and answers(),
                 message="a new proxy to answer on the same port")
        assert http_port() == port
        wait_for(lambda: serve.status().proxies == {"local": "HEALTHY"},
                 message="the proxy to be reported healthy")
        assert httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10).text == "success"


DRIVER_SCRIPT = """
    import json, os, time
    from ladle import serve
    from ladle._api import lifecycle

    @serve.deployment(num_replicas=2)
    class Model:
        def __call__(self, request=None):
            return os.getpid()

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    serve.run(Model.bind(), route_prefix="/model")
    pids = lifecycle.instance_pids()
    print(json.dumps({"pids": pids, "port": lifecycle.http_port()}), flush=True)
    time.sleep(120)  # the driver's workload: stay up until killed
"""


def test_sigkilled_driver_leaves_no_replica_and_no_proxy(tmp_path: Path) -> None:
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER_SCRIPT))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=tmp_path)
    pids: list[int] = []
    try:
        info = json.loads(read_line_within(driver, 30))
        pids = list(info["pids"].values())
        assert "proxy" in info["pids"] and len(pids) == 3  # two replicas and the proxy
        assert not any(gone(pid) for pid in pids)
        port = info["port"]
        assert httpx.get(f"http://127.0.0.1:{port}/model", timeout=10).status_code == 200

        driver.kill()
        driver.wait(timeout=10)
        wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10,
                 message="the replicas and the proxy of the killed driver to exit")
        try:
            httpx.get(f"http://127.0.0.1:{port}/model", timeout=10)
            raise AssertionError("the port still answers")
        except httpx.ConnectError:
            pass
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if driver.stdout is not None:
            driver.stdout.close()
