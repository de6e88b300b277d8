"""The local control and data planes are private to the user who started the instance.

The run directory and its parent are 0700 and every socket in them 0600; another local
user (``nobody``) cannot connect to any of them; the only TCP listener in any ladle
process is the HTTP proxy's, on 127.0.0.1 unless told otherwise.  (Tracebacks reach
HTTP clients only in debug mode: tests/http/test_status_codes.py.)
"""

from __future__ import annotations

import os
import pwd
import socket
import stat
import warnings
from pathlib import Path

import psutil
import pytest

from ladle import serve
from ladle._api import lifecycle
from ladle._api.config import HTTPOptions


@serve.deployment
class Hello:
    def __call__(self, name: str = "you") -> str:
        return f"hello {name}"


def start() -> tuple[Path, dict[str, Path]]:
    """An instance with a proxy and one replica; its run dir and its sockets by role."""
    serve.start(http_options={"port": 0})  # the default host
    handle = serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    assert handle.remote().result(timeout_s=10) == "hello you"
    instance = lifecycle._instance
    assert instance is not None
    controller = instance.controller
    run_dir = Path(controller.backend.run_dir)
    (replica,) = controller._apps["hello"].deployments["Hello"].replicas.values()
    sockets = {
        "controller": Path(controller.address.partition(":")[2]),
        "replica": Path(replica.address.partition(":")[2]),
        "proxy": run_dir / "proxy.sock",
    }
    return run_dir, sockets


def test_run_dir_and_sockets_are_private() -> None:
    run_dir, sockets = start()
    for directory in (run_dir, run_dir.parent):
        info = os.stat(directory)
        assert stat.S_ISDIR(info.st_mode)
        assert info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700, (directory, oct(info.st_mode))
    found = sorted(run_dir.glob("*.sock"))
    assert set(sockets.values()) <= set(found), found
    for path in found:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode), path
        assert info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o600, (path, oct(info.st_mode))


def test_another_user_cannot_connect() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to switch to another user (nobody) in a child process")
    nobody = pwd.getpwnam("nobody")
    _, sockets = start()
    # The owner can connect to each (so a refusal below is about who is asking).
    for path in sockets.values():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(path))

    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: become nobody, try each socket, report, exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            lines = []
            for role, path in sockets.items():
                try:
                    with socket.socket(socket.AF_UNIX) as sock:
                        sock.settimeout(5)
                        sock.connect(str(path))
                    outcome = "connected"
                except OSError as exc:
                    outcome = type(exc).__name__
                lines.append(f"{role} {outcome}")
            os.write(write_end, ("\n".join(lines) + f"\nuid {os.getuid()}").encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    os.waitpid(pid, 0)
    outcomes = dict(line.split(" ", 1) for line in report.splitlines())
    assert outcomes.pop("uid") == str(nobody.pw_uid), report
    assert outcomes == {role: "PermissionError" for role in sockets}, report


def _inet_sockets(proc: psutil.Process) -> list:
    get = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return get(kind="inet")


def test_only_the_proxy_listens_on_tcp_and_only_on_loopback() -> None:
    assert HTTPOptions().host == "127.0.0.1"
    start()
    port = lifecycle.http_port()
    proxy_pid = lifecycle._instance.controller.backend.pids()["proxy"]  # type: ignore[union-attr]
    driver = psutil.Process()
    children = driver.children(recursive=True)
    assert proxy_pid in {child.pid for child in children}
    listening, datagram = [], []
    for proc in [driver, *children]:
        for conn in _inet_sockets(proc):
            if conn.type == socket.SOCK_STREAM and conn.status == psutil.CONN_LISTEN:
                listening.append((proc.pid, conn.laddr.ip, conn.laddr.port))
            elif conn.type == socket.SOCK_DGRAM and proc.pid != driver.pid:
                datagram.append((proc.pid, conn.laddr))
    assert listening == [(proxy_pid, "127.0.0.1", port)]
    assert datagram == []
