"""Shared memory on one local Unix connection: large buffers lent as segments, by fd.

A connection made by ``open_connection`` carries a second socket, its fd
channel: one end of a SOCK_SEQPACKET socketpair, sent to the server with
SCM_RIGHTS in the connection's first bytes (``HELLO``, which can never be a
frame).  A frame with the SHM flag names its large buffers by segment id
(``_core/shared_memory.py``); the first time a segment is lent on the
connection, its fd goes over the channel in a message tagged with a number
the frame carries, so a frame always finds its fds (they were sent before it).
The peer maps each segment once and reads buffers in place; when the value
built on a buffer is dropped there, it sends RELEASE and the segment goes back
to the pool.  A pool that destroys a free segment sends DROP, and the peer
unmaps it.  When the connection closes, segments still lent are abandoned
(never reused: the peer may still map them), and the peer's maps go when the
values on them go.  TCP connections have no channel: their buffers travel
inline, as before.
"""

from __future__ import annotations

import array
import ctypes
import itertools
import mmap
import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ..._core.shared_memory import MIN_BYTES, Segment, SegmentMap, pool

# Never a frame: a length past MAX_FRAME_BYTES.
HELLO = b"\xff\xff\xff\xffladle-fd"
_U64 = struct.Struct("<Q")
_ENTRY = struct.Struct("<QQ")  # size (top bit: in a segment), segment id
_IN_SEGMENT = 1 << 63
_MAX_FDS = 250  # SCM_MAX_FD is 253


def channel_pair() -> tuple[socket.socket, socket.socket] | None:
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:
        return None


class ShmLink:
    """One connection's shared memory, both ways; used on the connection's loop
    (``released`` and ``forget_segment`` from any thread)."""

    def __init__(self, channel: socket.socket, send_ids: Callable[[int, bytes], None],
                 release_kind: int, drop_kind: int) -> None:
        import asyncio

        channel.setblocking(False)
        self._chan = channel
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._send_ids = send_ids
        self._release_kind = release_kind
        self._drop_kind = drop_kind
        self._msg_ids = itertools.count(1)
        self._lent: dict[int, list[Any]] = {}  # segment id -> [segment, uses not released]
        self._peer_has: dict[int, Segment] = {}  # our segments whose fd the peer holds
        self._maps: dict[int, mmap.mmap] = {}  # the peer's segments, mapped here
        self._stash: dict[int, list[int]] = {}  # fds that came before the frame needing them
        self.closed = False

    # ------------------------------------------------------------- sending

    def encode(self, raws: list[memoryview]) -> tuple[bytes, list[Any]]:
        """The buffer table of a SHM frame, and the buffers that still travel inline."""
        entries: list[tuple[int, Segment | None]] = []
        new: list[Segment] = []
        for raw in raws:
            n = raw.nbytes
            seg: Segment | None = None
            if n >= MIN_BYTES:
                owner = raw.obj
                seg = owner.segment if type(owner) is SegmentMap else pool.copy_of(raw)
                pool.lend(seg)
                if seg.id not in self._peer_has and seg not in new:
                    new.append(seg)
            entries.append((n, seg))
        msg_id = 0
        if new:
            msg_id = next(self._msg_ids)
            if not self._send_fds(msg_id, [s.fd for s in new]):
                msg_id = 0
                entries = self._inline(entries, set(id(s) for s in new))
            else:
                for s in new:
                    self._peer_has[s.id] = s
                    s.peers.add(self)
        table = [_U64.pack(msg_id)]
        inline: list[Any] = []
        lent = self._lent
        for (n, seg), raw in zip(entries, raws):
            if seg is None:
                table.append(_ENTRY.pack(n, 0))
                inline.append(raw if type(raw.obj) is not SegmentMap else bytes(raw))
            else:
                table.append(_ENTRY.pack(n | _IN_SEGMENT, seg.id))
                entry = lent.get(seg.id)
                if entry is None:
                    lent[seg.id] = [seg, 1]
                else:
                    entry[1] += 1
        return b"".join(table), inline

    def _inline(self, entries: list[tuple[int, Segment | None]],
                unsent: set[int]) -> list[tuple[int, Segment | None]]:
        """Entries whose segment's fd could not be sent travel inline instead."""
        out: list[tuple[int, Segment | None]] = []
        for n, seg in entries:
            if seg is not None and id(seg) in unsent:
                pool.release_lent(seg)
                seg = None
            out.append((n, seg))
        return out

    def _send_fds(self, msg_id: int, fds: list[int]) -> bool:
        if len(fds) > _MAX_FDS or self.closed:
            return False
        try:
            self._chan.sendmsg([_U64.pack(msg_id)],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except OSError:  # the channel is full, too many fds in flight, or the peer is gone
            return False
        return True

    def on_release(self, payload: bytes) -> None:
        """RELEASE from the peer: it dropped values built on these segments."""
        lent = self._lent
        for (seg_id,) in _U64.iter_unpack(payload):
            entry = lent.get(seg_id)
            if entry is None:
                continue
            entry[1] -= 1
            if entry[1] == 0:
                del lent[seg_id]
            pool.release_lent(entry[0])

    def forget_segment(self, seg_id: int) -> None:
        """The pool destroyed one of our segments: the peer unmaps it (any thread)."""
        if threading.get_ident() == self._loop_thread:
            self._forget(seg_id)
        else:
            try:
                self._loop.call_soon_threadsafe(self._forget, seg_id)
            except RuntimeError:
                pass  # the loop is closed, and the connection with it

    def _forget(self, seg_id: int) -> None:
        if self._peer_has.pop(seg_id, None) is not None and not self.closed:
            self._send_ids(self._drop_kind, _U64.pack(seg_id))

    # ----------------------------------------------------------- receiving

    def decode(self, view: memoryview, pos: int, count: int) -> tuple[list[Any], int, int]:
        """Read a SHM frame's table at ``pos``: its buffers (in segments, or None where
        an inline buffer goes), the inline sizes' total, and the position after it."""
        (msg_id,) = _U64.unpack_from(view, pos)
        pos += 8
        buffers: list[Any] = []
        inline_bytes = 0
        fds: list[int] | None = None
        maps = self._maps
        for _ in range(count):
            size, seg_id = _ENTRY.unpack_from(view, pos)
            pos += 16
            if not size & _IN_SEGMENT:
                buffers.append(size)
                inline_bytes += size
                continue
            size &= ~_IN_SEGMENT
            mapped = maps.get(seg_id)
            if mapped is None:
                if fds is None:
                    fds = self._take_fds(msg_id)
                if not fds:
                    raise ValueError(f"no fd for segment {seg_id}")
                fd = fds.pop(0)
                try:
                    mapped = maps[seg_id] = mmap.mmap(fd, 0)
                finally:
                    os.close(fd)
            if size > len(mapped):
                raise ValueError(f"segment {seg_id} is smaller than {size} bytes")
            region = (ctypes.c_ubyte * size).from_buffer(mapped)
            weakref.finalize(region, self.released, seg_id)
            buffers.append(region)
        for fd in fds or ():
            os.close(fd)
        return buffers, inline_bytes, pos

    def _take_fds(self, msg_id: int) -> list[int]:
        stashed = self._stash.pop(msg_id, None)
        if stashed is not None:
            return stashed
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._chan, 8, _MAX_FDS,
                                                  socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                raise ValueError(f"fd message {msg_id} is missing") from None
            if len(data) != 8:
                for fd in fds:
                    os.close(fd)
                raise ValueError("a malformed fd message")
            (got,) = _U64.unpack(data)
            if got == msg_id:
                return list(fds)
            self._stash[got] = list(fds)

    def released(self, seg_id: int) -> None:
        """A value built on the peer's segment ``seg_id`` was dropped (any thread)."""
        if threading.get_ident() == self._loop_thread:
            self._release(seg_id)
        else:
            try:
                self._loop.call_soon_threadsafe(self._release, seg_id)
            except RuntimeError:
                pass  # the loop is closed, and the connection with it

    def _release(self, seg_id: int) -> None:
        if not self.closed:
            self._send_ids(self._release_kind, _U64.pack(seg_id))

    def on_drop(self, payload: bytes) -> None:
        for (seg_id,) in _U64.iter_unpack(payload):
            self._maps.pop(seg_id, None)

    # ------------------------------------------------------------- closing

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        lent, self._lent = self._lent, {}
        for seg, uses in lent.values():
            seg.peers.discard(self)
            for _ in range(uses):
                pool.abandon(seg)
        for seg in self._peer_has.values():
            seg.peers.discard(self)
        self._peer_has.clear()
        self._maps.clear()  # each map goes when the last value on it does
        for fds in self._stash.values():
            for fd in fds:
                os.close(fd)
        self._stash.clear()
        self._chan.close()
