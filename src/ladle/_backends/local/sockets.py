"""Opening and serving the data plane's sockets: Unix ones with an fd channel, TCP ones
authenticated.

A Unix connection's first bytes (``HELLO``) carry the server the far end of its
fd channel (``shm_link.py``), so that large buffers can be lent in shared
memory; ``UnixServer`` takes it before handing the connection to its protocol.
TCP peers prove the instance's secret first (``tcp_auth.py``) and carry
buffers inline.  The framing itself is ``rpc.py``'s.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from ..._core import shared_memory
from ..._core.transport import RequestServer
from .rpc import Connection, ServerConnection
from .shm_link import HELLO, channel_pair
from .tcp_auth import open_tcp_connection


async def open_connection(address: str, *, secret: bytes | None = None,
                          handshake_timeout_s: float = 5.0) -> Connection:
    """Connect to ``unix:/path``, or to ``tcp:host:port`` with the instance's ``secret``
    (after a mutual proof of it); the Connection is bound to the running loop."""
    scheme, _, rest = address.partition(":")
    loop = asyncio.get_running_loop()
    if scheme == "unix":
        return await _open_unix(loop, address, rest)
    if scheme == "tcp":
        return await open_tcp_connection(address, rest, secret, handshake_timeout_s)
    raise ValueError(f"unsupported address {address!r} (expected unix:... or tcp:...)")


async def _open_unix(loop: asyncio.AbstractEventLoop, address: str, path: str) -> Connection:
    """A Unix connection whose first bytes (HELLO) carry the server its fd channel."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = None
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        pair = channel_pair() if shared_memory.AVAILABLE else None
        if pair is not None:
            channel, theirs = pair
            try:
                socket.send_fds(sock, [HELLO], [theirs.fileno()])
            except OSError:
                channel.close()
                channel = None
            finally:
                theirs.close()
        _, protocol = await loop.create_unix_connection(lambda: Connection(address, channel),
                                                        sock=sock)
    except BaseException:
        sock.close()
        if channel is not None:
            channel.close()
        raise
    return protocol


class UnixServer:
    """Accepts Unix connections, taking each one's fd channel from its HELLO first.

    A peer that sends no HELLO (any raw client) is served all the same, without
    shared memory: the bytes read in place of a HELLO go to its protocol first.
    """

    def __init__(self, sock: socket.socket, server: RequestServer) -> None:
        self._sock = sock
        self._server = server
        self._loop = asyncio.get_running_loop()
        self._waiting: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # out of fds, or the listener closed: the next accept retries
            conn.setblocking(False)
            self._waiting.add(conn)
            self._loop.add_reader(conn.fileno(), self._first_bytes, conn)

    def _first_bytes(self, conn: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn, len(HELLO), 1, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._loop.remove_reader(conn.fileno())
        self._waiting.discard(conn)
        channel = None
        if data == HELLO and len(fds) == 1:
            channel, data = socket.socket(fileno=fds[0]), b""
        else:
            for fd in fds:
                os.close(fd)
            if not data:  # closed before a byte
                conn.close()
                return
        task = self._loop.create_task(self._serve(conn, channel, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, channel: socket.socket | None,
                     prefix: bytes) -> None:
        try:
            await self._loop.connect_accepted_socket(
                lambda: ServerConnection(self._server, channel, prefix), conn)
        except OSError:
            conn.close()
            if channel is not None:
                channel.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for conn in self._waiting:
            self._loop.remove_reader(conn.fileno())
            conn.close()
        self._waiting.clear()


async def serve_socket(sock: Any, server: RequestServer) -> UnixServer:
    """Serve on a bound Unix socket (its file mode is the authentication)."""
    if sock.family != socket.AF_UNIX:
        raise ValueError("serve_socket takes a Unix socket; TCP listeners need serve_tcp "
                         "and a secret")
    return UnixServer(sock, server)
