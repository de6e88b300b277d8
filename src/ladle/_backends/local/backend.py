"""The local backend: replicas as child processes, requests over Unix sockets.

The run directory (mode 0700) holds one socket per process.  The parent
binds each replica's socket itself and passes the listening fd down, so
the address is live before the child has even started.  A child's stdin is
a pipe from the parent that is never written to after the spec: when it
reaches EOF, the parent is gone (even by SIGKILL) and the child exits.

In a long-lived instance the parent (the controller) may die and be
restarted without the children: they are given a *lifeline* instead, the
read end of a pipe whose write end the instance's supervisor holds, and
exit when that reaches EOF.  Each child's pid (and start time, against pid
reuse) is kept in ``<name>.pid``, so a restarted controller can ``adopt``
the processes its predecessor started: it watches them through a pidfd
(they are no longer its children) and stops them by signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
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


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process.

    A pid and its start time name one process for good: pids are reused, this pair isn't.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None  # exited; only waiting to be reaped
    return int(fields[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    return start_time is not None and process_start_time(pid) == start_time


def write_private(path: Path, data: str) -> None:
    """Write ``data`` to ``path`` (0600) atomically: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass(eq=False)
class _Adopted:
    """A process a previous controller started: not our child, watched through a pidfd."""

    pid: int
    on_exit: Callable[[str], None]
    pidfd: int = -1
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    poller: asyncio.Task[None] | None = None


def _package_root() -> str:
    import ladle

    return str(Path(ladle.__file__).resolve().parent.parent)


class LocalBackend:
    """Child processes on this machine; implements ``Backend``."""

    name = "local"
    in_process = False

    def __init__(self, run_dir: Path | None = None, *, lifeline_fd: int | None = None,
                 owns_run_dir: bool = True) -> None:
        self.run_dir = run_dir or make_private_dir(default_run_root())
        self._lifeline_fd = lifeline_fd
        self._owns_run_dir = owns_run_dir
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._adopted: dict[str, _Adopted] = {}
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
        args = [sys.executable, "-m", "ladle._backends.local.replica_main", str(sock.fileno()),
                name]
        fds: tuple[int, ...] = (sock.fileno(),)
        if self._lifeline_fd is not None:
            args[-1:-1] = ["--lifeline", str(self._lifeline_fd)]
            fds += (self._lifeline_fd,)
        try:
            payload = dumps((list(sys.path), os.getcwd(), dumps(target)))
            proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, pass_fds=fds, env=self._env)
        finally:
            sock.close()
        self._procs[name] = proc
        assert proc.stdin is not None
        proc.stdin.write(_LEN.pack(len(payload)) + payload)
        if self._lifeline_fd is not None:
            proc.stdin.close()  # flushed first; the child lives by its lifeline, not by us
            write_private(self.run_dir / f"{name}.pid", json.dumps(
                {"pid": proc.pid, "start": process_start_time(proc.pid)}))
        watcher = asyncio.get_running_loop().create_task(self._watch(name, proc, on_exit))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return address

    async def _watch(self, name: str, proc: asyncio.subprocess.Process,
                     on_exit: Callable[[str], None]) -> None:
        await proc.wait()
        if self._procs.get(name) is proc:
            del self._procs[name]
        self._forget_files(name)
        on_exit(name)

    def _forget_files(self, name: str) -> None:
        for suffix in (".sock", ".pid"):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / f"{name}{suffix}").unlink()

    # ---------------------------------------------------------------- adoption

    def live_names(self) -> list[str]:
        """Names of the processes recorded in the run directory that are still alive."""
        names = []
        for path in sorted(self.run_dir.glob("*.pid")):
            pid, start = _read_pid_file(path)
            if pid is not None and process_alive(pid, start):
                names.append(path.stem)
        return names

    async def adopt(self, name: str, *, on_exit: Callable[[str], None]) -> str | None:
        """Take over a live process a previous controller spawned as ``name``; return its
        address, or None (and forget its files) if it is gone.  ``on_exit`` as for spawn."""
        if name in self._procs or name in self._adopted:
            return f"unix:{self.run_dir / f'{name}.sock'}"
        pid, start = _read_pid_file(self.run_dir / f"{name}.pid")
        sock_path = self.run_dir / f"{name}.sock"
        if pid is None or not process_alive(pid, start) or not sock_path.exists():
            self._forget_files(name)
            return None
        adopted = _Adopted(pid, on_exit)
        loop = asyncio.get_running_loop()
        try:
            adopted.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._forget_files(name)
            return None
        except (AttributeError, OSError):
            adopted.poller = loop.create_task(self._poll_exit(name, adopted, start))
        else:
            loop.add_reader(adopted.pidfd, self._on_adopted_exit, name, adopted)
        self._adopted[name] = adopted
        return f"unix:{sock_path}"

    async def _poll_exit(self, name: str, adopted: _Adopted, start: int | None) -> None:
        # Without pidfds (old kernels): look now and then.
        while process_alive(adopted.pid, start):
            await asyncio.sleep(0.2)
        self._on_adopted_exit(name, adopted)

    def _on_adopted_exit(self, name: str, adopted: _Adopted) -> None:
        if adopted.exited.is_set():
            return
        adopted.exited.set()
        if adopted.pidfd >= 0:
            asyncio.get_running_loop().remove_reader(adopted.pidfd)
            os.close(adopted.pidfd)
            adopted.pidfd = -1
        if self._adopted.get(name) is adopted:
            del self._adopted[name]
        self._forget_files(name)
        adopted.on_exit(name)

    async def _stop_adopted(self, adopted: _Adopted, timeout_s: float) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if adopted.exited.is_set():
                return
            with contextlib.suppress(ProcessLookupError):
                if adopted.pidfd >= 0:
                    signal.pidfd_send_signal(adopted.pidfd, sig)
                else:
                    os.kill(adopted.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(adopted.exited.wait(), timeout_s)

    async def listen(self, server: RequestServer, *, name: str) -> str:
        sock, address = self._bind(name)
        self._servers.append(await serve_socket(sock, server))
        return address

    async def stop(self, name: str, *, timeout_s: float) -> None:
        adopted = self._adopted.get(name)
        if adopted is not None:
            await self._stop_adopted(adopted, timeout_s)
            return
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
        pids = {name: proc.pid for name, proc in self._procs.items()}
        pids.update((name, adopted.pid) for name, adopted in self._adopted.items())
        return pids

    async def aclose(self) -> None:
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for proc in list(self._procs.values()):
            await proc.wait()
        await asyncio.gather(*(self._stop_adopted(a, 0.0) for a in list(self._adopted.values())))
        for server in self._servers:
            server.close()
        for watcher in list(self._watchers):
            watcher.cancel()
        if self._owns_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def _read_pid_file(path: Path) -> tuple[int | None, int | None]:
    try:
        data = json.loads(path.read_text())
        return int(data["pid"]), data.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


async def _connect(address: str) -> Any:
    return await open_connection(address)


register_connector("unix", _connect)
