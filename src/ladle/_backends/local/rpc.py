"""Framed, multiplexed RPC over a stream socket (Unix domain on one machine).

Every frame is ``<u32 length><u8 kind><u64 key>`` then ``length`` payload
bytes.  Keys are chosen by the client, one per request on a connection, so
many requests share one socket.  Kinds:

  client → server   REQUEST, STREAM (a request whose answer is a stream),
                    CANCEL, CREDIT (the consumer can take N more items),
                    INPUT (a message into a running request: WebSocket frames)
  server → client   RESULT, ERROR, ITEM, END

A payload with the OOB flag starts with its out-of-band buffer table (pickle
protocol 5), so large arrays are written without another copy.  Writes made
in one loop iteration are coalesced into one system call.  Nothing here
knows what a replica or a controller is: a ``RequestServer`` answers.

On a Unix socket the file's mode (0600, in a 0700 directory) is the
authentication; TCP peers authenticate first (``tcp_auth.py``).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..._core.context import new_request_id
from ..._core.errors import (
    LadleError,
    ReplicaDiedError,
    RequestCancelledError,
    pack_exception,
    unpack_exception,
)
from ..._core.inbox import Inbox
from ..._core.serialization import describe_unpicklable, dumps_oob
from ..._core.transport import DoneCallback, RequestServer, StreamReceiver

HEADER = struct.Struct("<IBQ")
HEADER_SIZE = HEADER.size
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

REQUEST, STREAM, CANCEL, CREDIT, RESULT, ERROR, ITEM, END, INPUT = range(1, 10)
OOB = 0x80
# A frame claiming more than this is garbage: drop the peer.  (Not a memory bound: the
# buffer grows only with bytes actually received, never with what a header claims.)
MAX_FRAME_BYTES = 1 << 31


def _limits(most: dict[int, int]) -> tuple[int, ...]:
    """Largest payload per header kind byte that one end accepts; -1 for a kind it never
    receives, so a garbage header is refused at once instead of waiting for its payload."""
    limits = [-1] * 256
    for kind, n in most.items():
        limits[kind] = n
    return tuple(limits)


_SERVER_LIMITS = _limits({
    REQUEST: MAX_FRAME_BYTES, REQUEST | OOB: MAX_FRAME_BYTES,
    STREAM: MAX_FRAME_BYTES, STREAM | OOB: MAX_FRAME_BYTES,
    INPUT: MAX_FRAME_BYTES, INPUT | OOB: MAX_FRAME_BYTES,
    CANCEL: 0, CREDIT: 4})
_CLIENT_LIMITS = _limits({
    RESULT: MAX_FRAME_BYTES, RESULT | OOB: MAX_FRAME_BYTES,
    ERROR: MAX_FRAME_BYTES, ERROR | OOB: MAX_FRAME_BYTES,
    ITEM: MAX_FRAME_BYTES, ITEM | OOB: MAX_FRAME_BYTES,
    END: 0})

# Parts (about two per frame) written at once at the latest; fewer wait for the end
# of the loop iteration, to share one system call.
_FLUSH_PARTS = 128

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


def _encode(kind: int, key: int, obj: Any) -> list[bytes | memoryview]:
    data, buffers = dumps_oob(obj)
    if not buffers:
        return [_pack_header(len(data), kind, key), data]
    raws = [b.raw() for b in buffers]
    table = U32.pack(len(raws)) + b"".join(U64.pack(r.nbytes) for r in raws)
    total = len(table) + len(data) + sum(r.nbytes for r in raws)
    return [_pack_header(total, kind | OOB, key), table, data, *raws]


def _decode(payload: bytes | bytearray, oob: bool) -> Any:
    if not oob:
        return pickle.loads(payload)
    view = memoryview(payload)
    (count,) = U32.unpack_from(view, 0)
    pos = 4
    sizes = []
    for _ in range(count):
        sizes.append(U64.unpack_from(view, pos)[0])
        pos += 8
    buffers_len = sum(sizes)
    main_end = len(view) - buffers_len
    main = view[pos:main_end]
    buffers = []
    pos = main_end
    for size in sizes:
        buffers.append(view[pos:pos + size])
        pos += size
    return pickle.loads(main, buffers=buffers)


class _FramedProtocol(asyncio.Protocol):
    """Frame parsing and coalesced writes, shared by both ends."""

    _limits = _SERVER_LIMITS
    _flush_now = False

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._rbuf = bytearray()
        self._out: list[bytes | memoryview] = []
        self._flush_scheduled = False
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._rbuf
        buf += data
        pos = 0
        end = len(buf)
        frame = self._frame
        limits = self._limits
        while end - pos >= HEADER_SIZE:
            length, kind, key = _unpack_header(buf, pos)
            if length > limits[kind]:
                self._protocol_error(f"frame of kind {kind} with {length} bytes")
                return
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            try:
                frame(kind, key, buf[pos + HEADER_SIZE:stop])
            except Exception as exc:  # a bad frame drops the peer, never the process
                self._protocol_error(repr(exc))
                return
            pos = stop
        if pos:
            del buf[:pos]
        if self._out and self._flush_now:
            self._flush()

    def _frame(self, kind: int, key: int, payload: bytearray) -> None:
        raise NotImplementedError

    def _protocol_error(self, why: str) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _send(self, parts: list[bytes | memoryview]) -> None:
        if self._closed:
            return
        out = self._out
        out.extend(parts)
        if len(out) >= _FLUSH_PARTS:
            # Don't hold a whole burst back to the end of the loop iteration: the
            # peer can start on its first part while this side makes the rest.
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out = self._out
        if not out or self._transport is None or self._closed:
            out.clear()
            return
        self._out = []
        if len(out) <= _FLUSH_PARTS:
            self._transport.write(b"".join(out))
        else:
            self._transport.writelines(out)


# ---------------------------------------------------------------- client side


class Connection(_FramedProtocol):
    """Client end: one per (process, loop, peer); implements ``Remote``."""

    _limits = _CLIENT_LIMITS
    # Requests sent while answers were read (a router filling the slots they freed)
    # go out at once: the replica starts on them while this side writes the answers.
    _flush_now = True

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self._next_key = 1
        # key -> (future or receiver, on_done, is_stream)
        self._pending: dict[int, tuple[Any, DoneCallback | None, bool]] = {}
        self._close_callbacks: list[Callable[[], None]] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        if self._closed:
            self._loop.call_soon(callback)
        else:
            self._close_callbacks.append(callback)

    def _start(self, kind: int, payload: Any, target: Any, on_done: DoneCallback | None,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        if self._closed:
            raise ReplicaDiedError(f"connection to {self.address} is closed")
        key = self._next_key
        self._next_key = key + 1
        try:
            parts = _encode(kind, key, payload)
        except LadleError:
            raise  # already says what is wrong (e.g. a DeploymentResponse nested in a list)
        except Exception as exc:
            raise TypeError(
                f"Could not serialize the request: {describe_unpicklable(args, kwargs)}"
            ) from exc
        self._pending[key] = (target, on_done, kind == STREAM)
        self._send(parts)
        return key

    def start_unary(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                    fut: asyncio.Future[Any], on_done: DoneCallback | None) -> int:
        return self._start(REQUEST, (meta, args, kwargs), fut, on_done, args, kwargs)

    def start_stream(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                     receiver: StreamReceiver, on_done: DoneCallback | None, window: int) -> int:
        return self._start(STREAM, (meta, args, kwargs, window), receiver, on_done, args, kwargs)

    def cancel(self, key: int) -> None:
        if key in self._pending:
            self._send([_pack_header(0, CANCEL, key)])

    def grant(self, key: int, credit: int) -> None:
        if key in self._pending:
            self._send([_pack_header(4, CREDIT, key), U32.pack(credit)])

    def send_input(self, key: int, item: Any) -> None:
        if key in self._pending:
            self._send(_encode(INPUT, key, item))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fut: asyncio.Future[Any] = self._loop.create_future()
        key = self.start_unary((new_request_id(), method, "", False, ""), args, kwargs, fut, None)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(key)
            raise

    def _frame(self, kind: int, key: int, payload: bytearray) -> None:
        oob = bool(kind & OOB)
        kind &= ~OOB
        if kind == ITEM:
            entry = self._pending.get(key)
            if entry is not None:
                entry[0].push(_decode(payload, oob))
            return
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        target, on_done, is_stream = entry
        if kind == RESULT:
            if not target.done():
                try:
                    target.set_result(_decode(payload, oob))
                except Exception as exc:
                    target.set_exception(TypeError(f"Could not load the result: {exc!r}"))
        elif kind == END:
            target.end()
        elif kind == ERROR:
            exc_bytes, tb = _decode(payload, oob)
            error = unpack_exception(exc_bytes, tb)
            if is_stream:
                target.fail(error)
            elif not target.done():
                target.set_exception(error)
        if on_done is not None:
            on_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        pending, self._pending = self._pending, {}
        for target, on_done, is_stream in pending.values():
            err = ReplicaDiedError(
                f"The replica at {self.address} died or closed the connection "
                "while the request was in flight.")
            if is_stream:
                target.fail(err)
            elif not target.done():
                target.set_exception(err)
            if on_done is not None:
                on_done()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for cb in callbacks:
            cb()

    async def aclose(self) -> None:
        if self._transport is not None and not self._closed:
            self._flush()
            self._transport.close()


# ---------------------------------------------------------------- server side


class _Reply:
    """ReplySink for one request on a server connection."""

    __slots__ = ("_conn", "_key", "_credit", "_waiter", "_finished", "inbox", "task")

    def __init__(self, conn: ServerConnection, key: int, credit: int) -> None:
        self._conn = conn
        self._key = key
        self._credit = credit
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self.inbox: Inbox | None = None
        # What start_request returned: cancelled with the request.  Set on the reply,
        # not in the connection's table, which a worker thread may already have left.
        self.task: Any = None

    def result(self, value: Any) -> None:
        parts = _encode(RESULT, self._key, value)  # may raise: the replica reports it
        self._finish(parts)

    def error(self, exc: BaseException) -> None:
        data, tb = pack_exception(exc)
        self._finish(_encode(ERROR, self._key, (data, tb)))

    def item(self, value: Any) -> bool:
        self._conn._send(_encode(ITEM, self._key, value))
        self._credit -= 1
        return self._credit > 0

    async def wait_credit(self) -> None:
        while self._credit <= 0 and not self._conn._closed:
            self._waiter = self._conn._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def next_input(self) -> Any:
        if self.inbox is None:
            self.inbox = Inbox()
        return await self.inbox.get()

    def add_credit(self, n: int) -> None:
        self._credit += n
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def end(self) -> None:
        self._finish([_pack_header(0, END, self._key)])

    def _finish(self, parts: list[bytes | memoryview]) -> None:
        if self._finished:
            return
        self._finished = True
        conn = self._conn
        conn._send(parts)
        conn._requests.pop(self._key, None)

    def finish_from_thread(self, item: Any) -> None:
        """From a worker thread: send ``item`` as the stream's only item, and its end,
        without waiting for the loop (``ServerConnection.write_from_thread``)."""
        parts = _encode(ITEM, self._key, item)
        parts.append(_pack_header(0, END, self._key))
        conn = self._conn
        with conn._write_lock:
            if self._finished:
                return  # the connection is gone
            self._finished = True
            conn._write_from_thread(b"".join(parts))
        conn._requests.pop(self._key, None)


class ServerConnection(_FramedProtocol):
    """Server end of one client connection; hands requests to a RequestServer."""

    def __init__(self, server: RequestServer) -> None:
        super().__init__()
        self._server = server
        self._requests: dict[int, _Reply] = {}
        # Worker threads write answers too (_Reply.finish_from_thread): every write to
        # the socket, and the queue of writes, is under this lock.  The loop's writes go
        # through ``_flush``; nothing else writes to the transport.
        self._write_lock = threading.Lock()
        self._fd = -1  # a duplicate, so that its number cannot be reused under a writer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = os.dup(sock.fileno())

    def _flush(self) -> None:
        with self._write_lock:
            super()._flush()

    def _write_from_thread(self, data: bytes) -> None:
        """Whole frames from a worker thread, under ``_write_lock``: straight to the
        socket when nothing of the loop's is waiting to go out (so no frame is cut by
        another), else queued for the loop."""
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return
        if self._fd >= 0 and not self._out and not transport.get_write_buffer_size():
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the peer is gone: the loop sees the connection close
            if written == len(data):
                return
            data = data[written:]
        self._out.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:
                pass  # the loop is closed, and with it the connection

    def _frame(self, kind: int, key: int, payload: bytearray) -> None:
        oob = bool(kind & OOB)
        kind &= ~OOB
        if kind == REQUEST:
            meta, args, kwargs = _decode(payload, oob)
            reply = _Reply(self, key, 0)
            self._requests[key] = reply
            reply.task = self._server.start_request(meta, args, kwargs, reply)
        elif kind == STREAM:
            meta, args, kwargs, window = _decode(payload, oob)
            reply = _Reply(self, key, window)
            self._requests[key] = reply
            reply.task = self._server.start_request(meta, args, kwargs, reply)
        elif kind == CANCEL:
            found = self._requests.get(key)
            if found is not None:
                reply = found
                task = reply.task
                if task is not None:
                    task.cancel()
                    # A task cancelled before its first step (or while waiting for a slot)
                    # never reaches its own handler; the client waits for an answer.
                    task.add_done_callback(lambda _: reply.error(  # no-op if it answered
                        RequestCancelledError("The request was cancelled.")))
                else:
                    reply.error(RequestCancelledError("The request was cancelled."))
        elif kind == CREDIT:
            (credit,) = U32.unpack(payload)  # exactly 4 bytes, or the peer is dropped
            target = self._requests.get(key)
            if target is not None:
                target.add_credit(credit)
        elif kind == INPUT:
            target = self._requests.get(key)
            if target is not None:
                if target.inbox is None:
                    target.inbox = Inbox()
                target.inbox.put(_decode(payload, oob))
        else:
            raise ValueError(f"unexpected frame kind {kind}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        with self._write_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        requests, self._requests = self._requests, {}
        for reply in requests.values():
            reply._finished = True
            if reply.task is not None:
                reply.task.cancel()
            if reply._waiter is not None and not reply._waiter.done():
                reply._waiter.set_result(None)


async def open_connection(address: str, *, secret: bytes | None = None,
                          handshake_timeout_s: float = 5.0) -> Connection:
    """Connect to ``unix:/path``, or to ``tcp:host:port`` with the instance's ``secret``
    (after a mutual proof of it); the Connection is bound to the running loop."""
    scheme, _, rest = address.partition(":")
    loop = asyncio.get_running_loop()
    if scheme == "unix":
        _, protocol = await loop.create_unix_connection(lambda: Connection(address), rest)
        return protocol
    if scheme == "tcp":
        from .tcp_auth import open_tcp_connection

        return await open_tcp_connection(address, rest, secret, handshake_timeout_s)
    raise ValueError(f"unsupported address {address!r} (expected unix:... or tcp:...)")


async def serve_socket(sock: Any, server: RequestServer) -> asyncio.AbstractServer:
    """Serve on a bound Unix socket (its file mode is the authentication)."""
    if sock.family != socket.AF_UNIX:
        raise ValueError("serve_socket takes a Unix socket; TCP listeners need serve_tcp "
                         "and a secret")
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: ServerConnection(server), sock=sock)
