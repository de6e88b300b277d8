"""The echo protocol the ceilings measure: frames, two servers, and starting one.

A frame is a 4-byte big-endian length and that many payload bytes; the
server answers each frame with a frame holding the same payload.  The
``blocking`` server is one thread on a blocking socket; the ``uvloop`` server
is an ``asyncio.Protocol`` on uvloop that parses frames in ``data_received``
and answers each read with one batched ``write``; ``uvloop_each`` is the same
protocol with one ``write`` per reply frame, as an RPC server answering
requests one by one does.  ``sink`` (the large-payload ceiling) reads an
8-byte length and that many bytes into one reused, already faulted-in buffer
(the cheapest a receiver can do) and answers each with one byte.
Run as a script, this module is the server process: it inherits a listening
Unix socket (so clients never race its startup), serves one connection, and
exits when that closes or its deadline passes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

HEADER = struct.Struct("!I")
KINDS = ("blocking", "uvloop", "uvloop_each", "sink")
SINK_HEADER = struct.Struct("!Q")


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


class FrameParser:
    """Incremental parser: ``feed(data)`` returns the payloads completed by data."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while size - pos >= 4:
            end = pos + 4 + HEADER.unpack_from(buf, pos)[0]
            if end > size:
                break
            out.append(buf[pos + 4 : end])
            pos = end
        self._buf = buf[pos:]
        return out


def set_recv_timeout(sock: socket.socket, timeout_s: float) -> None:
    """Bound blocking ``recv`` in the kernel (SO_RCVTIMEO), leaving the socket blocking."""
    sec = int(timeout_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((timeout_s - sec) * 1e6)))


def recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill view from a blocking socket; False on EOF before the first byte."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise TimeoutError("recv timed out") from exc
        if n == 0:
            if got == 0:
                return False
            raise ConnectionError("peer closed mid-frame")
        got += n
    return True


def serve_sink(listener: socket.socket, deadline_s: float) -> None:
    listener.settimeout(deadline_s)
    conn, _ = listener.accept()
    listener.close()
    conn.setblocking(True)
    set_recv_timeout(conn, deadline_s)
    head = bytearray(SINK_HEADER.size)
    buf = bytearray()
    with conn:
        while recv_exact(conn, memoryview(head)):
            (size,) = SINK_HEADER.unpack(head)
            if size > len(buf):
                buf = bytearray(size)  # zero-filled: its pages are faulted in once
            recv_exact(conn, memoryview(buf)[:size])
            conn.sendall(b"k")


def serve_blocking(listener: socket.socket, deadline_s: float) -> None:
    listener.settimeout(deadline_s)
    conn, _ = listener.accept()
    listener.close()
    conn.setblocking(True)
    set_recv_timeout(conn, deadline_s)
    buf = bytearray(64 * 1024)
    view = memoryview(buf)
    with conn:
        while recv_exact(conn, view[:4]):
            size = 4 + HEADER.unpack_from(buf)[0]
            if size > len(buf):
                buf.extend(bytes(size - len(buf)))
                view = memoryview(buf)
            recv_exact(conn, view[4:size])
            conn.sendall(view[:size])


class EchoProtocol(asyncio.Protocol):
    """One connection: parse frames as they arrive, write one batch of replies per read.

    With ``batch=False``, each reply frame gets its own ``transport.write``.
    """

    def __init__(self, closed: asyncio.Future[None], *, batch: bool = True) -> None:
        self._closed = closed
        self._batch = batch
        self._parser = FrameParser()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        if self._batch:
            replies = [frame(payload) for payload in self._parser.feed(data)]
            if replies:
                self._transport.write(b"".join(replies))
        else:
            write = self._transport.write
            for payload in self._parser.feed(data):
                write(frame(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


async def serve_uvloop(listener: socket.socket, deadline_s: float, *, batch: bool = True) -> None:
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    server = await loop.create_unix_server(lambda: EchoProtocol(closed, batch=batch), sock=listener)
    try:
        await asyncio.wait_for(closed, deadline_s)
    finally:
        server.close()


@contextmanager
def echo_server(kind: str, path: Path, *, deadline_s: float) -> Iterator[int]:
    """Run an echo server process listening on path; yields its pid.

    On exit the server is waited for (it stops when the client closes), then
    terminated and killed by pid if it has not.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown echo server kind {kind!r}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(16)
        fd = listener.fileno()
        proc = subprocess.Popen(
            [sys.executable, __file__, kind, str(fd), f"{deadline_s:.3f}"],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
    finally:
        listener.close()
    try:
        yield proc.pid
    finally:
        for stop in (None, proc.terminate, proc.kill):
            if stop is not None:
                stop()
            try:
                proc.wait(timeout=2.0)
                break
            except subprocess.TimeoutExpired:
                continue


def main(argv: list[str]) -> None:
    kind, fd, deadline_s = argv[0], int(argv[1]), float(argv[2])
    # A last resort: the server outlives no run, whatever the client does.
    watchdog = threading.Timer(deadline_s + 5.0, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    listener = socket.socket(fileno=fd)
    if kind == "blocking":
        serve_blocking(listener, deadline_s)
    elif kind == "sink":
        serve_sink(listener, deadline_s)
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_uvloop(listener, deadline_s, batch=kind == "uvloop"))


if __name__ == "__main__":
    main(sys.argv[1:])
