"""Fresh Python processes for the startup and memory scenarios.

``first_line`` times a command from ``Popen`` to the first line it prints
(interpreter teardown is not counted), then lets it finish.  ``hold`` keeps a
process running, after its first line, while the caller measures it; closing
its stdin is the signal to finish.  Either kills the process if it overruns.
A child's stderr goes to a file and its last lines are quoted on failure.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PYTHON = sys.executable


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no line from the child before the deadline")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ChildProcessError(f"child exited (code {proc.wait()}) before printing a line")
            buf += chunk
    return buf.split(b"\n", 1)[0]


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> str | None:
    """Close stdin, wait, then terminate and kill; what went wrong, if anything."""
    if grace_s <= 0:
        proc.kill()
        proc.wait()
        return None
    if proc.stdin is not None and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None:
            stop()
        try:
            rc = proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        if stop is not None:
            return f"child did not finish within {grace_s:.0f} s of its stdin closing"
        return None if rc == 0 else f"child exited with code {rc}"
    proc.wait()
    return "child could not be killed"


def _stderr_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-3:])


@contextmanager
def hold(cmd: Sequence[str], *, stderr_path: Path, timeout_s: float,
         grace_s: float = 10.0) -> Iterator[tuple[int, str, float]]:
    """Start cmd; yield ``(pid, first line, seconds from Popen to it)``; stop it on exit.

    On exit the child's stdin is closed and it gets ``grace_s`` to finish
    before it is terminated, then killed; if it had to be, or it exits with a
    non-zero code, this raises ``ChildProcessError``.  ``grace_s=0`` kills it
    at once, for children that are not meant to finish by themselves.
    """
    deadline = time.monotonic() + timeout_s
    with open(stderr_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        try:
            line = _read_line(proc, deadline)
        except (TimeoutError, ChildProcessError) as exc:
            raise type(exc)(f"{exc}; stderr: {_stderr_tail(stderr_path)}") from None
        elapsed = time.perf_counter() - t0
        yield proc.pid, line.decode(errors="replace"), elapsed
    except BaseException:
        _stop(proc, grace_s)
        raise
    else:
        problem = _stop(proc, grace_s)
        if problem is not None:
            raise ChildProcessError(f"{problem}; stderr: {_stderr_tail(stderr_path)}")
    finally:
        assert proc.stdout is not None
        proc.stdout.close()


def first_line(cmd: Sequence[str], *, stderr_path: Path, timeout_s: float) -> tuple[float, str]:
    """Seconds from ``Popen`` to cmd's first line of output, and that line.

    The child then runs to its end (stdin closed); a non-zero exit raises.
    """
    with hold(cmd, stderr_path=stderr_path, timeout_s=timeout_s) as (pid, line, elapsed):
        pass
    return elapsed, line
