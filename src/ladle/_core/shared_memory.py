"""Shared-memory segments for large buffers: a pool of memfds this process writes into.

A sender copies a large buffer into a ``Segment`` (one copy; the socket path
takes two) and a transport that can pass file descriptors (the local Unix
one) hands the segment's fd to the peer once, then only its id: the peer maps
it and reads in place.  A segment comes back to the pool when every peer that
got it has released it (its value was dropped there) and no local owner (a
``serialization.Snapshot``) holds it; the pool keeps a few free segments per
size class, already faulted in, because fresh pages cost more on a VM than the
copy itself.  A segment lent on a connection that dies is never reused: the
peer may still map it.  Nothing here knows about sockets; memfds only exist on
Linux (``AVAILABLE``), elsewhere transports copy as before.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

AVAILABLE = hasattr(os, "memfd_create")
# Buffers at least this large go through a segment; smaller ones are cheaper to copy.
MIN_BYTES = 256 * 1024
_SMALLEST_CLASS = MIN_BYTES
# Free segments kept for reuse: per size class, and in all.
_FREE_PER_CLASS = 4
_FREE_BYTES = 512 * 1024 * 1024


def _size_class(nbytes: int) -> int:
    size = _SMALLEST_CLASS
    while size < nbytes:
        size <<= 1
    return size


class SegmentMap(mmap.mmap):
    """This process's mapping of one of its own segments (the type marks it as such)."""

    segment: Segment


class Segment:
    """One memfd and this process's mapping of it.

    ``local`` counts owners in this process (snapshots); ``lent`` the uses
    that peers have not released yet; ``peers`` the links that hold its fd
    (told to unmap it when it is destroyed).
    """

    __slots__ = ("id", "capacity", "fd", "map", "local", "lent", "peers", "abandoned",
                 "__weakref__")

    def __init__(self, seg_id: int, capacity: int) -> None:
        self.id = seg_id
        self.capacity = capacity
        self.fd = os.memfd_create(f"ladle-{seg_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, capacity)
            self.map = SegmentMap(self.fd, capacity)
        except BaseException:
            os.close(self.fd)
            raise
        self.map.segment = self
        self.local = 0
        self.lent = 0
        self.peers: set[Any] = set()
        self.abandoned = False

    def view(self, nbytes: int) -> memoryview:
        return memoryview(self.map)[:nbytes]

    def _destroy(self) -> None:
        peers, self.peers = self.peers, set()
        for peer in peers:
            peer.forget_segment(self.id)
        try:
            self.map.close()
        except BufferError:
            pass  # a view of it is still alive: unmapped when that goes
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Pool:
    """The process's segments; thread-safe (large payloads only, so one lock is cheap)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._free: dict[int, list[Segment]] = {}
        self._free_bytes = 0
        self._live: dict[int, Segment] = {}

    def copy_of(self, data: memoryview, *, local: bool = False) -> Segment:
        """A segment holding a copy of ``data`` (a contiguous byte view); ``local`` counts
        an owner in this process that must call ``release_local``."""
        nbytes = data.nbytes
        seg = self._take(nbytes)
        try:
            seg.map[:nbytes] = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        except BaseException:
            self._give_back(seg)
            raise
        if local:
            with self._lock:
                seg.local += 1
        return seg

    def _take(self, nbytes: int) -> Segment:
        size = _size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                seg = free.pop()
                self._free_bytes -= size
                return seg
        seg = Segment(next(self._ids), size)
        with self._lock:
            self._live[seg.id] = seg
        return seg

    def lend(self, seg: Segment) -> None:
        """A peer got ``seg`` (it releases it later, or the link abandons it)."""
        with self._lock:
            seg.lent += 1

    def release_lent(self, seg: Segment) -> None:
        with self._lock:
            seg.lent -= 1
            done = seg.lent == 0 and seg.local == 0
        if done:
            self._give_back(seg)

    def release_local(self, seg: Segment) -> None:
        with self._lock:
            seg.local -= 1
            done = seg.lent == 0 and seg.local == 0
        if done:
            self._give_back(seg)

    def abandon(self, seg: Segment) -> None:
        """A peer that got ``seg`` is gone without releasing it: never reuse it."""
        with self._lock:
            seg.abandoned = True
            seg.lent -= 1
            done = seg.lent == 0 and seg.local == 0
        if done:
            self._give_back(seg)

    def _give_back(self, seg: Segment) -> None:
        destroy = True
        with self._lock:
            if not seg.abandoned and seg.fd >= 0:
                free = self._free.setdefault(seg.capacity, [])
                if len(free) < _FREE_PER_CLASS and self._free_bytes + seg.capacity <= _FREE_BYTES:
                    free.append(seg)
                    self._free_bytes += seg.capacity
                    destroy = False
            if destroy:
                self._live.pop(seg.id, None)
        if destroy:
            seg._destroy()

    def trim(self) -> None:
        """Destroy every free segment (their memory goes back to the system)."""
        with self._lock:
            free = [seg for segs in self._free.values() for seg in segs]
            self._free.clear()
            self._free_bytes = 0
            for seg in free:
                self._live.pop(seg.id, None)
        for seg in free:
            seg._destroy()

    def statistics(self) -> dict[str, int]:
        with self._lock:
            live = list(self._live.values())
            return {"segments": len(live), "free": sum(len(f) for f in self._free.values()),
                    "free_bytes": self._free_bytes,
                    "lent": sum(s.lent for s in live), "local": sum(s.local for s in live),
                    "bytes": sum(s.capacity for s in live)}


pool = Pool()


def release_on_drop(owner: object, callback: Callable[[], None]) -> None:
    """Call ``callback`` once ``owner`` is garbage (from whichever thread drops it)."""
    import weakref

    weakref.finalize(owner, callback)
