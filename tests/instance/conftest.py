"""A long-lived instance per test: its own run directory and free ports, shut down (and
checked to leave no process behind) when the test ends.

Everything talks to the instance from separate processes (``ladle ...`` or a
Python script), as users do; this pytest process never joins it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Instance:
    run_dir: Path
    app_dir: Path
    env: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.run_dir / "instance"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.info['http_port']}"

    @property
    def token(self) -> str:
        return (self.dir / "token").read_text().strip()

    def ladle(self, *args: str, timeout_s: float = 120, check: bool = False
              ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "ladle", *args], env=self.env,
                                cwd=self.app_dir, capture_output=True, text=True,
                                timeout=timeout_s)
        if check:
            assert result.returncode == 0, (result.stdout, result.stderr)
        return result

    def python(self, code: str, timeout_s: float = 120, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=self.env,
                                cwd=self.app_dir, capture_output=True, text=True,
                                timeout=timeout_s)
        if check:
            assert result.returncode == 0, (result.stdout, result.stderr)
        return result

    def start(self, *args: str) -> dict[str, Any]:
        self.ladle("start", "--http-port", "0", "--dashboard-port", "0", *args, check=True)
        self.info = self.read_info()
        return self.info

    def read_info(self) -> dict[str, Any]:
        info: dict[str, Any] = json.loads((self.dir / "instance.json").read_text())
        return info

    def rest(self, method: str, body: Any = None, token: str | None = None,
             headers_extra: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token if token is None else token}"}
        if token == "":
            headers = {}
        headers.update(headers_extra or {})
        return httpx.request(method, f"{self.read_info()['rest_url']}/api/serve/applications/",
                             json=body, headers=headers, timeout=120, **kwargs)

    def details(self) -> dict[str, Any]:
        response = self.rest("GET")
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def replica_pids(self, app: str) -> dict[str, set[int]]:
        deployments = self.details()["applications"][app]["deployments"]
        return {name: {r["pid"] for r in d["replicas"] if r["state"] == "RUNNING"}
                for name, d in deployments.items()}

    def processes(self) -> list[psutil.Process]:
        """The supervisor and everything under it (the controller, replicas, proxy)."""
        try:
            record = json.loads((self.dir / "supervisor.json").read_text())
            supervisor = psutil.Process(record["pid"])
            return [supervisor, *supervisor.children(recursive=True)]
        except (OSError, ValueError, psutil.Error):
            return []

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.http}{path}", timeout=30)

    def wait_running(self, app: str, timeout_s: float = 60) -> None:
        def running() -> bool:
            apps = self.details()["applications"]
            return app in apps and apps[app]["status"] == "RUNNING"
        wait_for(running, timeout_s=timeout_s, message=f"application {app!r} to run")


@contextlib.contextmanager
def popen(instance: Instance, *args: str, stderr_name: str = "run.err"
          ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``ladle ARGS`` in the background (its stderr in a file); killed if still running."""
    err_path = instance.app_dir / stderr_name
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ladle", *args], env=instance.env,
                                cwd=instance.app_dir, stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield proc, err_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    # Short: Unix socket paths must stay under ~100 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="ladle-i-"))
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    env = dict(os.environ, LADLE_RUN_DIR=str(run_dir))
    env.pop("LADLE_ADDRESS", None)
    inst = Instance(run_dir, app_dir, env)
    seen: dict[int, psutil.Process] = {}
    try:
        yield inst
        for proc in inst.processes():
            seen[proc.pid] = proc
    finally:
        for proc in inst.processes():
            seen[proc.pid] = proc
        if (inst.dir / "supervisor.json").exists():
            inst.ladle("shutdown", timeout_s=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in seen.values()):
            time.sleep(0.05)
        survivors = [p for p in seen.values() if alive(p)]
        for proc in survivors:
            proc.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert not survivors, f"the instance left processes behind: {survivors}"
