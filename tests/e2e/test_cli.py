"""The ``ladle`` command: ``run`` in the foreground, ``status``, ``shutdown``, bad import paths.

Every test runs the real command (``python -m ladle ...``) with its own
``LADLE_RUN_DIR``, so ``status``/``shutdown`` find only the instance the
test started, never one of a test running beside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import wait_for

APP = textwrap.dedent('''
    from ladle import serve

    @serve.deployment(num_replicas=2)
    class Hello:
        def __call__(self, name: str = "world") -> str:
            return f"Hello {name}!"

    app = Hello.bind()

    def build():
        return Hello.options(name="Built", num_replicas=1).bind()

    NOT_AN_APP = 42
''')


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short: Unix socket paths must stay under ~100 bytes.
    path = Path(tempfile.mkdtemp(prefix="ladle-cli-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(APP)
    (tmp_path / "cli_broken.py").write_text(textwrap.dedent('''
        def load_weights():
            raise RuntimeError("weights missing")

        load_weights()
    '''))
    return tmp_path


@pytest.fixture
def ladle(run_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    env = dict(os.environ, LADLE_RUN_DIR=str(run_dir))

    def ladle(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ladle", *args], env=env,
                              capture_output=True, text=True, timeout=60)
    return ladle


@pytest.fixture
def start(run_dir: Path, app_dir: Path,
          ladle: Callable[..., subprocess.CompletedProcess[str]]
          ) -> Iterator[Callable[..., tuple[subprocess.Popen[str], str]]]:
    """Start ``ladle run ARGS`` and wait until ``ladle status`` shows it RUNNING."""
    env = dict(os.environ, LADLE_RUN_DIR=str(run_dir))
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], str]:
        stderr = open(app_dir / f"stderr-{len(procs)}.txt", "w")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "ladle", "run", *args, "--port", "0",
                                 "--app-dir",
                                 str(app_dir)], env=env, stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True)
        stderr.close()
        procs.append(proc)

        def ready() -> str | None:
            assert proc.poll() is None, f"ladle run exited early with {proc.returncode}"
            out = ladle("status").stdout
            return out if "status: RUNNING" in out else None

        return proc, wait_for(ready, timeout_s=30, message="`ladle status` to show RUNNING")

    yield start
    for proc in procs:  # a failed test must not leak the instance
        if proc.poll() is None:
            for child in _tree(proc):
                child.kill()
            proc.kill()
            proc.wait()


def _tree(proc: subprocess.Popen[str], *, replicas_only: bool = False) -> list[psutil.Process]:
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    if replicas_only:
        children = [c for c in children if _cmdline(c)[-1:] != ["proxy"]]
    return children


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def test_run_status_and_ctrl_c(start, ladle, app_dir: Path, run_dir: Path) -> None:
    proc, status = start("cli_app:app")
    lines = status.splitlines()
    assert lines[6].startswith("    last_deployed_time_s: ")  # Ray's `serve status` layout
    del lines[6]
    assert lines == [
        "proxies:",
        "  local: HEALTHY",
        "applications:",
        "  default:",
        "    status: RUNNING",
        "    message: ''",
        "    deployments:",
        "      Hello:",
        "        status: HEALTHY",
        "        status_trigger: CONFIG_UPDATE_COMPLETED",
        "        replica_states:",
        "          RUNNING: 2",
        "        message: ''",
        "target_capacity: null",
    ]
    replicas = [p.pid for p in _tree(proc, replicas_only=True)]
    assert len(replicas) == 2
    assert (run_dir / "current").exists()

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    wait_for(lambda: _gone(replicas), message="the replicas to exit")
    err = (app_dir / "stderr-0.txt").read_text()
    assert "is ready" in err and "Traceback" not in err

    after = ladle("status")
    assert (after.returncode, after.stderr.strip()) == (1, "ladle: error: no running instance")
    assert not (run_dir / "current").exists()


def test_ladle_shutdown_stops_a_running_instance(start, ladle, run_dir: Path) -> None:
    # `module.attribute` naming a function that builds the application.
    proc, status = start("cli_app.build", "--name", "built", "--route-prefix", "/b",
                         "--host", "127.0.0.1", "--port", "8123")
    assert "  built:" in status and "Built:" in status
    replicas = [p.pid for p in _tree(proc, replicas_only=True)]
    assert len(replicas) == 1

    done = ladle("shutdown")
    assert done.returncode == 0, done.stderr
    assert proc.wait(timeout=30) == 0  # the owning `ladle run` exits too
    assert _gone(replicas)  # `ladle shutdown` returns once the replicas are gone
    assert ladle("status").returncode == 1
    assert not (run_dir / "current").exists()
    nothing = ladle("shutdown")
    assert (nothing.returncode, nothing.stderr.strip()) == (1, "ladle: error: no running instance")


def test_sigterm_stops_a_deployment_target(start, ladle) -> None:
    proc, status = start("cli_app:Hello")  # a Deployment: bound with no arguments
    assert "RUNNING: 2" in status
    replicas = [p.pid for p in _tree(proc, replicas_only=True)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    wait_for(lambda: _gone(replicas), message="the replicas to exit")


HTTP_APP = textwrap.dedent('''
    from fastapi import FastAPI

    from ladle import serve

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Greeter:
        def __init__(self, greeting: str) -> None:
            self.greeting = greeting

        @api.get("/greet/{name}")
        def greet(self, name: str) -> dict:
            return {"message": f"{self.greeting} {name}!"}

    app = Greeter.bind("Hi")
''')


def test_run_serves_http_on_the_given_host_and_port(app_dir: Path, run_dir: Path) -> None:
    (app_dir / "cli_http.py").write_text(HTTP_APP)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # a free port, released for `ladle run`
        port = sock.getsockname()[1]
    stderr = open(app_dir / "stderr-http.txt", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "ladle", "run", "cli_http:app", "--route-prefix", "/api",
         "--host", "127.0.0.1", "--port", str(port), "--app-dir", str(app_dir)],
        env=dict(os.environ, LADLE_RUN_DIR=str(run_dir)), stdout=subprocess.DEVNULL,
        stderr=stderr, text=True)
    stderr.close()
    try:
        def answered() -> httpx.Response | None:
            assert proc.poll() is None, f"ladle run exited early with {proc.returncode}"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/api/greet/Ann", timeout=10)
            except httpx.TransportError:
                return None  # not listening yet
            return response if response.status_code != 404 else None  # not deployed yet

        response = wait_for(answered, timeout_s=30, message=f"ladle run to answer on {port}")
        assert (response.status_code, response.json()) == (200, {"message": "Hi Ann!"})
        children = [p.pid for p in _tree(proc)]
        assert len(children) == 2  # the replica and the proxy
        assert [c for c in _tree(proc) if _cmdline(c)[-1:] == ["proxy"]]
        err = (app_dir / "stderr-http.txt").read_text()
        assert f"is ready at http://127.0.0.1:{port}/api" in err

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        wait_for(lambda: _gone(children), message="the replica and the proxy to exit")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/api/greet/Ann", timeout=10)
    finally:
        if proc.poll() is None:  # a failed test must not leak the instance
            for child in _tree(proc):
                child.kill()
            proc.kill()
            proc.wait()


def test_bad_import_paths_fail_with_one_clear_line(ladle, app_dir: Path) -> None:
    def run(path: str) -> tuple[int, str]:
        result = ladle("run", path, "--app-dir", str(app_dir))
        return result.returncode, result.stderr

    code, err = run("no_such_module:app")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == ("ladle: error: no module named 'no_such_module' "
                                    "(looked in the app dir and sys.path; set --app-dir)")

    code, err = run("cli_app:nope")
    assert code == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == "ladle: error: module 'cli_app' has no attribute 'nope'"

    code, err = run("cli_app:NOT_AN_APP")
    assert code == 1 and "Traceback" not in err
    assert "is int, not an application" in err.splitlines()[-1]

    code, err = run("cli_app")
    assert code == 1 and "must look like 'module:attribute'" in err

    # An exception in the user's module shows the user's traceback (only theirs).
    code, err = run("cli_broken:app")
    assert code == 1
    assert "Traceback" in err and 'raise RuntimeError("weights missing")' in err
    assert "cli_broken.py" in err and "_cli.py" not in err and "importlib" not in err
    assert err.splitlines()[-1] == ("ladle: error: importing 'cli_broken:app' raised "
                                    "RuntimeError (traceback above)")
