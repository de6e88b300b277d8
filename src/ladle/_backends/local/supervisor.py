"""The supervisor of a long-lived local instance: keeps its controller process running.

``python -m ladle._backends.local.supervisor DIR -- COMMAND...`` runs in its
own session (detached from the terminal that started it) and does nothing
but this:

- it runs COMMAND (the controller process) and, when that dies by a signal
  or a non-zero exit, runs it again at once (backing off only if it keeps
  dying within seconds of starting); exit status 0 means the instance was
  shut down: the supervisor removes DIR and exits, and so does exit status
  ``FATAL`` (the instance could not start: don't retry);
- it holds the write end of the *lifeline* pipe.  The controller passes the
  read end to every replica and proxy it starts, so they outlive the
  controller but not the instance (``replica_main --lifeline``);
- it is the child subreaper: replicas whose controller died become its
  children, and it reaps them when they exit;
- on SIGTERM or SIGINT it asks the controller to shut the instance down (by
  SIGTERM) and waits for it.

The first controller gets the fd of the ``ladle start`` command's ready pipe
(``LADLE_READY_FD``) to say when it serves or why it can't.  Nothing here
imports the rest of ladle: this process must be hard to kill by accident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from .proctitle import set_cmdline

FATAL = 3
_PR_SET_CHILD_SUBREAPER = 36
# Restarted faster than this many times in a row within _QUICK_S: back off.
_QUICK_S = 5.0
_MAX_BACKOFF_S = 5.0


def _become_subreaper() -> None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:
        pass  # orphans go to init instead, which reaps them too


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def main() -> int:
    run_dir = Path(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1:]
    set_cmdline(f"ladle::supervisor {run_dir}")
    _become_subreaper()
    lifeline_read, lifeline_write = os.pipe()
    ready_fd = int(os.environ.pop("LADLE_READY_FD", "-1"))
    pid_file = run_dir / "supervisor.json"
    tmp = run_dir / ".supervisor.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "start": _start_time(os.getpid())}, f)
    os.replace(tmp, pid_file)

    stopping = False
    controller = -1

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if controller > 0:
            try:
                os.kill(controller, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    quick_failures = 0
    while True:
        env = dict(os.environ, LADLE_LIFELINE=f"{lifeline_read},{lifeline_write}")
        fds = [lifeline_read, lifeline_write]
        if ready_fd >= 0:
            env["LADLE_READY_FD"] = str(ready_fd)
            fds.append(ready_fd)
        started = time.monotonic()
        controller = _spawn(command, env, fds)
        if ready_fd >= 0:
            os.close(ready_fd)  # only the first controller reports to `ladle start`
            ready_fd = -1
        status = _wait_for(controller)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) in (0, FATAL):
            break
        if stopping:
            break
        quick_failures = quick_failures + 1 if time.monotonic() - started < _QUICK_S else 0
        if quick_failures > 3:
            time.sleep(min(0.1 * 2 ** (quick_failures - 3), _MAX_BACKOFF_S))
    # The controller is gone and has stopped what it ran; orphans still alive see the
    # lifeline close with this process.
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def _spawn(command: list[str], env: dict[str, str], fds: list[int]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            for fd in fds:
                os.set_inheritable(fd, True)
            os.execvpe(command[0], command, env)
        finally:
            os._exit(127)
    return pid


def _wait_for(controller: int) -> int:
    """Reap children (orphaned replicas too) until the controller exits; its status."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        except InterruptedError:
            continue
        if pid == controller:
            return status


if __name__ == "__main__":
    sys.exit(main())
