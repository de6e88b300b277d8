"""The local backend: replicas as child processes, requests over Unix sockets.

The run directory (mode 0700) holds one socket per process.  The parent
binds each replica's socket itself and passes the listening fd down, so
the address is live before the child has even started.  A child's stdin is
a pipe from the parent that is never written to after the spec: when it
reaches EOF, the parent is gone (even by SIGKILL) and the child exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._core.serialization import dumps
from ..._core.transport import RequestServer, Servable, register_connector
from .sockets import open_connection, serve_socket

_LEN = struct.Struct("<Q")


def default_run_root() -> Path:
    return Path(tempfile.gettempdir()) / f"ladle-{os.getuid()}"


def make_private_dir(root: Path) -> Path:
    """A new instance directory (0700) under ``root``, which must be ours."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_uid != os.getuid():
        raise PermissionError(f"{root} belongs to another user; set LADLE_RUN_DIR")
    os.chmod(root, 0o700)
    _remove_stale(root)
    run_dir = Path(tempfile.mkdtemp(prefix="inst-", dir=root))
    (run_dir / "owner.pid").write_text(str(os.getpid()))
    return run_dir


def _remove_stale(root: Path) -> None:
    """Drop directories of instances whose owner died without cleaning up (e.g. SIGKILL)."""
    for entry in root.glob("inst-*"):
        try:
            pid = int((entry / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, ValueError):
            continue


def _package_root() -> str:
    import ladle

    return str(Path(ladle.__file__).resolve().parent.parent)


class LocalBackend:
    """Child processes on this machine; implements ``Backend``."""

    name = "local"
    in_process = False

    def __init__(self, run_dir: Path | None = None) -> None:
        self.run_dir = run_dir or make_private_dir(default_run_root())
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._servers: list[Any] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
        self._env = env

    def _bind(self, name: str) -> tuple[socket.socket, str]:
        path = self.run_dir / f"{name}.sock"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        sock.listen(1024)
        return sock, f"unix:{path}"

    async def spawn(self, target: Callable[[], Servable], *, name: str,
                    on_exit: Callable[[str], None]) -> str:
        sock, address = self._bind(name)
        try:
            payload = dumps((list(sys.path), os.getcwd(), dumps(target)))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ladle._backends.local.replica_main", str(sock.fileno()), name,
                stdin=asyncio.subprocess.PIPE, pass_fds=(sock.fileno(),), env=self._env)
        finally:
            sock.close()
        self._procs[name] = proc
        assert proc.stdin is not None
        proc.stdin.write(_LEN.pack(len(payload)) + payload)
        watcher = asyncio.get_running_loop().create_task(self._watch(name, proc, on_exit))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return address

    async def _watch(self, name: str, proc: asyncio.subprocess.Process,
                     on_exit: Callable[[str], None]) -> None:
        await proc.wait()
        if self._procs.get(name) is proc:
            del self._procs[name]
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / f"{name}.sock").unlink()
        on_exit(name)

    async def listen(self, server: RequestServer, *, name: str) -> str:
        sock, address = self._bind(name)
        self._servers.append(await serve_socket(sock, server))
        return address

    async def stop(self, name: str, *, timeout_s: float) -> None:
        proc = self._procs.get(name)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items()}

    async def aclose(self) -> None:
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in list(self._procs.values()):
            await proc.wait()
        for server in self._servers:
            server.close()
        for watcher in list(self._watchers):
            watcher.cancel()
        shutil.rmtree(self.run_dir, ignore_errors=True)


async def _connect(address: str) -> Any:
    return await open_connection(address)


register_connector("unix", _connect)
