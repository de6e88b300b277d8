"""Framed, multiplexed RPC over a stream socket (Unix domain on one machine).

Every frame is ``<u32 length><u8 kind><u64 key>`` then ``length`` payload
bytes.  Keys are chosen by the client, one per request on a connection, so
many requests share one socket.  Kinds:

  client → server   REQUEST, STREAM (a request whose answer is a stream),
                    CANCEL, CREDIT (the consumer can take N more items),
                    INPUT (a message into a running request: WebSocket frames)
  server → client   RESULT, ERROR, ITEM, END
  both ways         RELEASE, DROP (shared-memory segments: ``shm_link.py``)

A payload with the OOB flag starts with its out-of-band buffer table (pickle
protocol 5), so large arrays are written without another copy; with the SHM
flag too, the large ones are not written at all but lent in shared memory
(on a Unix connection that has an fd channel).  Writes made in one loop
iteration are coalesced into one system call; the first item of a stream
leaves at once.  Nothing here knows what a replica or a controller is: a
``RequestServer`` answers.

On a Unix socket the file's mode (0600, in a 0700 directory) is the
authentication; TCP peers authenticate first (``tcp_auth.py``).  Opening and
serving sockets is ``sockets.py``'s.
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
from ..._core import shared_memory
from ..._core.serialization import describe_unpicklable, dumps_oob, out_of_band
from ..._core.shared_memory import SegmentMap
from ..._core.transport import DoneCallback, RequestServer, StreamReceiver
from .shm_link import ShmLink

HEADER = struct.Struct("<IBQ")
HEADER_SIZE = HEADER.size
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

REQUEST, STREAM, CANCEL, CREDIT, RESULT, ERROR, ITEM, END, INPUT, RELEASE, DROP = range(1, 12)
OOB = 0x80
SHM = 0x40
_FLAGS = OOB | SHM
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


_IDS_BYTES = 8 << 16  # RELEASE/DROP: segment ids, 8 bytes each


def _data_limits(*kinds: int, shm: bool) -> dict[int, int]:
    flags = (0, OOB, OOB | SHM) if shm else (0, OOB)
    return {kind | f: MAX_FRAME_BYTES for kind in kinds for f in flags}


def _server_limits(shm: bool) -> tuple[int, ...]:
    ids = {RELEASE: _IDS_BYTES, DROP: _IDS_BYTES} if shm else {}
    return _limits({**_data_limits(REQUEST, STREAM, INPUT, shm=shm), CANCEL: 0, CREDIT: 4, **ids})


def _client_limits(shm: bool) -> tuple[int, ...]:
    ids = {RELEASE: _IDS_BYTES, DROP: _IDS_BYTES} if shm else {}
    return _limits({**_data_limits(RESULT, ERROR, ITEM, shm=shm), END: 0, **ids})


# Without an fd channel, shared-memory kinds are garbage like any unknown kind.
_SERVER_LIMITS, _SERVER_SHM_LIMITS = _server_limits(False), _server_limits(True)
_CLIENT_LIMITS, _CLIENT_SHM_LIMITS = _client_limits(False), _client_limits(True)

# Parts (about two per frame) written at once at the latest; fewer wait for the end
# of the loop iteration, to share one system call.
_FLUSH_PARTS = 128

_pack_header = HEADER.pack
_unpack_header = HEADER.unpack_from


def _encode(kind: int, key: int, obj: Any, link: ShmLink | None = None) -> list[bytes | memoryview]:
    data, buffers = dumps_oob(obj)
    if not buffers:
        return [_pack_header(len(data), kind, key), data]
    raws: list[Any] = [b.raw() for b in buffers]
    if link is not None and not link.closed:
        table, inline = link.encode(raws)
        head = U32.pack(len(raws)) + table
        total = len(head) + len(data) + sum(r.nbytes for r in inline)
        return [_pack_header(total, kind | OOB | SHM, key), head, data, *inline]
    # A segment's memory is reused once its owner lets go, maybe before this is
    # written: copy it now.
    raws = [bytes(r) if type(r.obj) is SegmentMap else r for r in raws]
    table = U32.pack(len(raws)) + b"".join(U64.pack(len(r)) for r in raws)
    total = len(table) + len(data) + sum(len(r) for r in raws)
    return [_pack_header(total, kind | OOB, key), table, data, *raws]


def _decode(payload: bytes | bytearray, flags: int, link: ShmLink | None = None) -> Any:
    if not flags:
        return pickle.loads(payload)
    view = memoryview(payload)
    (count,) = U32.unpack_from(view, 0)
    pos = 4
    if flags & SHM:
        if link is None:
            raise ValueError("a shared-memory frame on a connection without an fd channel")
        buffers, buffers_len, pos = link.decode(view, pos, count)
    else:
        buffers = []
        for _ in range(count):
            buffers.append(U64.unpack_from(view, pos)[0])
            pos += 8
        buffers_len = sum(buffers)
    main_end = len(view) - buffers_len
    if main_end < pos:
        raise ValueError("buffers larger than the frame")
    main = view[pos:main_end]
    pos = main_end
    for i, size in enumerate(buffers):
        if type(size) is int:  # inline: its bytes follow the pickle
            buffers[i] = view[pos:pos + size]
            pos += size
    return pickle.loads(main, buffers=buffers)


def _out_of_band_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """``(args, kwargs)`` with large top-level ``bytes`` wrapped to go out of band; None
    when there are none (most requests)."""
    big = shared_memory.MIN_BYTES
    for value in args:
        if type(value) is bytes and len(value) >= big:
            break
    else:
        if not kwargs or not any(type(v) is bytes and len(v) >= big for v in kwargs.values()):
            return None
    return (tuple([out_of_band(v) for v in args]),
            {k: out_of_band(v) for k, v in kwargs.items()})


class _FramedProtocol(asyncio.Protocol):
    """Frame parsing and coalesced writes, shared by both ends."""

    _limits = _SERVER_LIMITS
    _shm_limits = _SERVER_SHM_LIMITS
    _flush_now = False

    def __init__(self, channel: socket.socket | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._rbuf = bytearray()
        self._out: list[bytes | memoryview] = []
        self._flush_scheduled = False
        self._closed = False
        self._channel = channel
        self._link: ShmLink | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        channel, self._channel = self._channel, None
        if channel is not None:
            self._link = ShmLink(channel, self._send_ids, RELEASE, DROP)
            self._limits = self._shm_limits

    def _send_ids(self, kind: int, payload: bytes) -> None:
        self._send([_pack_header(len(payload), kind, 0), payload])

    def _shm_frame(self, kind: int, payload: bytearray) -> None:
        """RELEASE or DROP from the peer."""
        link = self._link
        if link is None or len(payload) % 8:
            raise ValueError(f"unexpected frame kind {kind}")
        if kind == RELEASE:
            link.on_release(bytes(payload))
        else:
            link.on_drop(bytes(payload))

    def _close_link(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            link.close()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

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
    _shm_limits = _CLIENT_SHM_LIMITS
    # Requests sent while answers were read (a router filling the slots they freed)
    # go out at once: the replica starts on them while this side writes the answers.
    _flush_now = True

    def __init__(self, address: str, channel: socket.socket | None = None) -> None:
        super().__init__(channel)
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
            wrapped = _out_of_band_args(args, kwargs)
            if wrapped is not None:
                payload = (payload[0], *wrapped, *payload[3:])
            parts = _encode(kind, key, payload, self._link)
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
            self._send(_encode(INPUT, key, item, self._link))

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fut: asyncio.Future[Any] = self._loop.create_future()
        key = self.start_unary((new_request_id(), method, "", False, ""), args, kwargs, fut, None)
        try:
            return await fut
        except asyncio.CancelledError:
            self.cancel(key)
            raise

    def _frame(self, kind: int, key: int, payload: bytearray) -> None:
        flags = kind & _FLAGS
        kind &= ~_FLAGS
        if kind == ITEM:
            entry = self._pending.get(key)
            if entry is not None:
                entry[0].push(_decode(payload, flags, self._link))
            return
        if kind == RELEASE or kind == DROP:
            self._shm_frame(kind, payload)
            return
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        target, on_done, is_stream = entry
        if kind == RESULT:
            if not target.done():
                try:
                    target.set_result(_decode(payload, flags, self._link))
                except Exception as exc:
                    target.set_exception(TypeError(f"Could not load the result: {exc!r}"))
        elif kind == END:
            target.end()
        elif kind == ERROR:
            exc_bytes, tb = _decode(payload, flags, self._link)
            error = unpack_exception(exc_bytes, tb)
            if is_stream:
                target.fail(error)
            elif not target.done():
                target.set_exception(error)
        if on_done is not None:
            on_done()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._close_link()
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

    __slots__ = ("_conn", "_key", "_credit", "_waiter", "_finished", "inbox", "task", "_sent_one")

    def __init__(self, conn: ServerConnection, key: int, credit: int) -> None:
        self._conn = conn
        self._key = key
        self._credit = credit
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._sent_one = False
        self.inbox: Inbox | None = None
        # What start_request returned: cancelled with the request.  Set on the reply,
        # not in the connection's table, which a worker thread may already have left.
        self.task: Any = None

    def result(self, value: Any) -> None:
        # may raise: the replica reports it
        parts = _encode(RESULT, self._key, out_of_band(value), self._conn._link)
        self._finish(parts)

    def error(self, exc: BaseException) -> None:
        data, tb = pack_exception(exc)
        self._finish(_encode(ERROR, self._key, (data, tb)))

    def item(self, value: Any) -> bool:
        conn = self._conn
        parts = _encode(ITEM, self._key, out_of_band(value), conn._link)
        if self._sent_one:
            conn._send(parts)  # with whatever else this loop pass sends
        else:
            # The first item leaves at once (time to first token), even while the
            # producer keeps the loop busy: uvloop would hold it to the pass's end.
            self._sent_one = True
            conn._send_now(parts)
        self._credit -= 1
        return self._credit > 0

    def last_item(self, value: Any) -> None:
        """``item(value)`` then ``end()``: a whole answer, sent with whatever else this
        loop pass sends (not at once, as a stream's first item is)."""
        parts = _encode(ITEM, self._key, out_of_band(value), self._conn._link)
        parts.append(_pack_header(0, END, self._key))
        self._finish(parts)

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
        # Not needed any more; kept, it would tie a cancelled task's traceback (and
        # the arguments in its frames, maybe shared memory) into a cycle, and what runs
        # the request may hold this reply (a SyncHttpCall does).
        self.task = None
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
            self.task = None  # as in _finish
            conn._write_from_thread(b"".join(parts))
        conn._requests.pop(self._key, None)


class ServerConnection(_FramedProtocol):
    """Server end of one client connection; hands requests to a RequestServer."""

    def __init__(self, server: RequestServer, channel: socket.socket | None = None,
                 prefix: bytes = b"") -> None:
        super().__init__(channel)
        self._prefix = prefix  # bytes read before this protocol took the connection
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
        prefix, self._prefix = self._prefix, b""
        if prefix:
            self.data_received(prefix)

    def _flush(self) -> None:
        with self._write_lock:
            super()._flush()

    def _send_now(self, parts: list[bytes | memoryview]) -> None:
        """Write ``parts`` to the socket now when nothing is queued before them."""
        if self._closed:
            return
        with self._write_lock:
            if not self._out:
                self._write_from_thread(b"".join(parts))
                return
        self._send(parts)

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
        flags = kind & _FLAGS
        kind &= ~_FLAGS
        if kind == REQUEST:
            meta, args, kwargs = _decode(payload, flags, self._link)
            reply = _Reply(self, key, 0)
            self._requests[key] = reply
            reply.task = self._server.start_request(meta, args, kwargs, reply)
        elif kind == STREAM:
            meta, args, kwargs, window = _decode(payload, flags, self._link)
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
                        RequestCancelledError()))
                else:
                    reply.error(RequestCancelledError())
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
                target.inbox.put(_decode(payload, flags, self._link))
        elif kind == RELEASE or kind == DROP:
            self._shm_frame(kind, payload)
        else:
            raise ValueError(f"unexpected frame kind {kind}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._close_link()
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
