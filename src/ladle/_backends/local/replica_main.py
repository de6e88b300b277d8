"""Entry point of a local-backend child process:
``python -m ...replica_main FD [--lifeline FD] NAME``.

NAME (a replica id, or ``proxy``) is only there so ``ps`` shows who is who
(the short process name, for ``ps -e`` and ``top``, is ``ladle::replica``
or ``ladle::proxy``).

Reads ``(sys.path, cwd, pickled factory)`` from stdin, serves the built
``Servable`` on the inherited listening socket, and exits when it is told to
stop, on SIGTERM, or as soon as stdin reaches EOF (the parent died).  With
``--lifeline``, that fd's EOF is what ends it instead (the instance is gone;
the parent controller may die and be replaced without it).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import struct
import sys


def _read_exactly(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            os._exit(1)  # the parent died before sending the spec
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def main() -> None:
    # Ctrl-C in the terminal reaches the whole process group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listen_fd = int(sys.argv[1])
    lifeline_fd = int(sys.argv[3]) if sys.argv[2:3] == ["--lifeline"] else 0
    from .proctitle import set_comm

    set_comm("ladle::proxy" if sys.argv[-1] == "proxy" else "ladle::replica")
    (length,) = struct.unpack("<Q", _read_exactly(0, 8))
    sys_path, cwd, target_bytes = pickle.loads(_read_exactly(0, length))
    for entry in reversed(sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    from ..._core.loop import new_event_loop
    from . import backend as _backend  # noqa: F401  (registers the unix connector)
    from .sockets import serve_socket

    target = pickle.loads(target_bytes)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def serve() -> None:
        servable = target()
        sock = socket.socket(fileno=listen_fd)
        server = await serve_socket(sock, servable)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_reader(lifeline_fd, _on_parent_gone, lifeline_fd)
        run = loop.create_task(servable.run())
        waiter = loop.create_task(stop.wait())
        await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
        server.close()
        if not run.done():
            run.cancel()
            # Let the servable clean up (an ingress app's lifespan shutdown); the
            # parent kills this process if that takes too long.
            await asyncio.wait([run])

    try:
        loop.run_until_complete(serve())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # don't wait for user threads stuck in the pool


def _on_parent_gone(fd: int) -> None:
    try:
        data = os.read(fd, 4096)
    except OSError:
        data = b""
    if not data:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
