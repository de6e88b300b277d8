"""A long-lived local instance on disk: finding it, telling alive from stale, starting it.

One per run root (``LADLE_RUN_DIR``, else ``$TMPDIR/ladle-<uid>``), in
``<root>/instance/`` (0700, ours):

  supervisor.json  pid and start time of the supervisor (``supervisor.py``)
  options.json     how ``ladle start`` configured it (read by every controller)
  instance.json    written by each controller once it serves: its control
                   address, HTTP and REST addresses, pid
  token            the REST API's bearer token (0600: only the user reads it)
  state.json, blobs/          the controller's store (``_control/store.py``)
  controller.sock, <name>.sock, <name>.pid    the processes' sockets and pids
  instance.log     what the supervisor and the controllers write

An instance is alive while its supervisor or its controller process is (pid
and start time, so a reused pid doesn't count).  A directory whose processes
are all gone is stale: it is removed, and nothing is ever sent to its socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .backend import default_run_root, process_alive

DIRNAME = "instance"


class InstanceError(RuntimeError):
    """The instance can't be used: another user's, failed to start, or not answering."""


def run_root(configured: str | None) -> Path:
    return Path(configured) if configured else default_run_root()


def instance_dir(root: Path) -> Path:
    return root / DIRNAME


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_ours(path: Path) -> None:
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise InstanceError(f"The ladle instance in {path} belongs to another user (uid "
                            f"{owner}); only its own user may connect to it.")


def _alive(record: dict[str, Any] | None) -> bool:
    return (record is not None and isinstance(record.get("pid"), int)
            and process_alive(record["pid"], record.get("start")))


def find(root: Path) -> dict[str, Any] | None:
    """The running instance under ``root`` (its ``instance.json``, or ``{"starting": True}``
    while its first controller comes up), or None.  A stale directory is removed."""
    directory = instance_dir(root)
    try:
        _check_ours(directory)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise InstanceError(f"The ladle instance in {directory} belongs to another user; "
                            "only its own user may connect to it.") from None
    supervisor = _read_json(directory / "supervisor.json")
    info = _read_json(directory / "instance.json")
    controller = None if info is None else {"pid": info.get("controller_pid"),
                                            "start": info.get("controller_start")}
    if _alive(supervisor) or _alive(controller):
        return info if info is not None else {"starting": True, "dir": str(directory)}
    if supervisor is None and time.time() - directory.stat().st_mtime < 5.0:
        return {"starting": True, "dir": str(directory)}  # `ladle start` is creating it
    remove_stale(directory)
    return None


def remove_stale(directory: Path) -> None:
    """Remove a dead instance's directory (its processes, if any, die with their lifeline)."""
    shutil.rmtree(directory, ignore_errors=True)


def supervisor_pid(root: Path) -> tuple[int, int | None] | None:
    record = _read_json(instance_dir(root) / "supervisor.json")
    if record is None or not _alive(record):
        return None
    return record["pid"], record.get("start")


def wait_gone(root: Path, timeout_s: float) -> bool:
    """Wait until the instance's supervisor has exited (it removes the directory last)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = supervisor_pid(root)
        if found is None:
            return True
        time.sleep(0.02)
    return False


def start(root: Path, options: dict[str, Any], *, timeout_s: float = 60.0) -> dict[str, Any]:
    """Start a detached instance under ``root`` with ``options``; return its
    ``instance.json`` once it serves.  Raises InstanceError if it can't start."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_ours(root)
    os.chmod(root, 0o700)
    directory = instance_dir(root)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        raise InstanceError(f"An instance is already running in {directory}.") from None
    (directory / "options.json").write_text(json.dumps(options))
    os.chmod(directory / "options.json", 0o600)
    ready_read, ready_write = os.pipe()
    log = os.open(directory / "instance.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    command = [sys.executable, "-m", "ladle._backends.local.supervisor", str(directory), "--",
               sys.executable, "-m", "ladle._api.instance_main", str(directory)]
    env = dict(os.environ, LADLE_READY_FD=str(ready_write))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", ""))
                                        if p)
    try:
        # A new session: no terminal, no process group to be hit by the shell's Ctrl-C.
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                         pass_fds=(ready_write,), start_new_session=True, cwd="/")
    finally:
        os.close(ready_write)
        os.close(log)
    try:
        line = _read_line(ready_read, timeout_s)
    finally:
        os.close(ready_read)
    if line.startswith("ready "):
        info: dict[str, Any] = json.loads(line[6:])
        return info
    detail = line[6:] if line.startswith("error ") else (
        f"it exited without saying why (see {directory / 'instance.log'})" if not line else line)
    raise InstanceError(f"The instance failed to start: {detail}")


def _read_line(fd: int, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InstanceError(f"The instance did not start within {timeout_s:.0f}s.")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").partition("\n")[0]


def report_ready(info: dict[str, Any] | None, error: str | None = None) -> None:
    """From the first controller: tell the waiting ``ladle start`` it serves (or why not)."""
    fd = int(os.environ.pop("LADLE_READY_FD", "-1"))
    if fd < 0:
        return
    line = f"ready {json.dumps(info)}\n" if error is None else \
        "error " + error.replace("\n", " ") + "\n"
    with contextlib.suppress(OSError):
        os.write(fd, line.encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def lifeline_fds() -> tuple[int, int] | None:
    raw = os.environ.pop("LADLE_LIFELINE", "")
    if not raw:
        return None
    read_fd, write_fd = (int(x) for x in raw.split(","))
    return read_fd, write_fd


def _package_root() -> str:
    import ladle

    return str(Path(ladle.__file__).resolve().parent.parent)
