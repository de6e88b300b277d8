"""Fixtures every test shares: a clean instance per test, and no leaked processes."""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ladle import serve

# Tests send SIGINT (Ctrl-C) to the examples and commands they start.  A test run
# started in the background by a script (`pytest &`) ignores SIGINT, as POSIX shells
# do to background jobs, and its children would inherit that and never stop.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0, interval_s: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        time.sleep(interval_s)


def read_line_within(proc: subprocess.Popen[str], timeout_s: float) -> str:
    """The next line a child process prints on stdout, or fail after ``timeout_s``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"the process printed nothing within {timeout_s}s")
    return proc.stdout.readline()


def replica_pids() -> set[int]:
    """Pids of the live replica processes (not the proxy) this test process started."""
    pids = set()
    for proc in _children():
        try:
            cmdline = proc.cmdline()
            if ("ladle._backends.local.replica_main" in cmdline and cmdline[-1] != "proxy"
                    and proc.status() != psutil.STATUS_ZOMBIE):
                pids.add(proc.pid)
        except psutil.Error:
            pass
    return pids


def gone(pid: int) -> bool:
    """The process has exited (or is a zombie its parent has not reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def lines(path: Path) -> list[str]:
    """The lines of a file a replica appends to; none while it does not exist."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    """Everything a server sends until it closes; fails if it is still open at the bound."""
    deadline = time.monotonic() + timeout_s
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the server kept the connection open for {timeout_s}s "
                                 f"after sending {received[:300]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        except TimeoutError:
            continue
        if not chunk:
            return received
        received += chunk


@pytest.fixture
def http_url() -> Iterator[str]:
    """Start ladle with its HTTP proxy on a free port; yield ``http://127.0.0.1:PORT``."""
    from ladle._api.lifecycle import http_port

    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    port = http_port()
    assert port
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Shut the instance down after each test; any child process left is a failure."""
    before = {p.pid for p in _children()}
    yield
    shutdown_and_check_no_leaks(before, "test")


def shutdown_and_check_no_leaks(before: set[int], what: str) -> None:
    """``serve.shutdown()``, then fail if a child not in ``before`` outlives a deadline."""
    serve.shutdown()
    deadline = time.monotonic() + 10
    leaked: list[psutil.Process] = []
    while time.monotonic() < deadline:
        leaked = [p for p in _children() if p.pid not in before and _alive(p)]
        if not leaked:
            return
        time.sleep(0.05)
    for proc in leaked:
        proc.kill()
    pytest.fail(f"{what} leaked processes: {[(p.pid, _cmdline(p)) for p in leaked]}")


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
