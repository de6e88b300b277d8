"""Process names: what ``ps`` and ``top`` show for each of an instance's processes.

``set_comm`` sets the kernel's short name (``ps -e``, ``top``, ``pgrep``; 15
bytes).  ``set_cmdline`` also rewrites the command line ``ps aux`` shows, in
place in the process's own argument memory (through ``/proc/self/mem``), as
``setproctitle`` does, so ``ladle::controller`` reads like Ray's
``ray::ServeController``.  Both are best effort: on failure the name stays.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

_PR_SET_NAME = 15


def set_comm(name: str) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def set_cmdline(title: str) -> None:
    """Replace this process's command line with ``title`` (cut to the original's length)."""
    set_comm(title.split(" ", 1)[0])
    with contextlib.suppress(Exception):
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # Fields after the parenthesised name; arg_start and arg_end are fields 48 and 49.
        fields = stat[stat.rindex(b")") + 2:].split()
        start, end = int(fields[45]), int(fields[46])
        data = title.encode()[:end - start - 1]
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data + b"\0" * (end - start - len(data)))
