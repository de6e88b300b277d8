"""How values cross a process boundary: pickle protocol 5, through cloudpickle when needed.

cloudpickle ships classes and functions defined in ``__main__``, a notebook
or a test function by value; plain builtin values (most requests) go through
the C pickler alone, which is several times cheaper.  Large buffers (bytes, NumPy arrays) go out of band so
the transport can write them without another copy.  Loading is plain
``pickle.loads`` — only ever on bytes from another ladle process, never on
bytes from an HTTP client.
"""

from __future__ import annotations

import io
import pickle
import threading
from typing import Any

import cloudpickle

# Buffers smaller than this are cheaper to copy into the pickle than to frame.
_OUT_OF_BAND_MIN_BYTES = 64 * 1024


class _NotPlain(Exception):
    """The plain pickler met a value that isn't a builtin: cloudpickle takes over."""


class _PlainPickler(pickle.Pickler):
    """C-speed pickling of builtin values only, which is what most requests carry.

    ``reducer_override`` is only consulted for values that aren't builtins (or
    builtin containers); any such value aborts, and cloudpickle pickles the
    whole object instead, shipping classes from ``__main__`` by value.
    """

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


class _Picklers(threading.local):
    """The picklers of one thread, reused: building one costs more than using it."""

    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[pickle.PickleBuffer] = []
        self.plain = _PlainPickler(self.file, protocol=5)
        self.full = cloudpickle.Pickler(self.file, protocol=5, buffer_callback=self._keep)
        self.busy = False

    def _keep(self, buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes >= _OUT_OF_BAND_MIN_BYTES:
            self.buffers.append(buf)
            return False
        return True


_local = _Picklers()


def dumps_oob(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle ``obj`` with its large buffers kept aside (pickle protocol 5)."""
    state = _local
    if state.busy:  # re-entered from a __reduce__: use a fresh pickler
        buffers: list[pickle.PickleBuffer] = []
        data: bytes = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        return data, buffers
    state.busy = True
    f = state.file
    try:
        try:
            state.plain.dump(obj)
        except _NotPlain:
            state.plain.clear_memo()
            f.seek(0)
            f.truncate()
            state.full.dump(obj)
        data = f.getvalue()
        buffers, state.buffers = state.buffers, []
        return data, buffers
    finally:
        state.plain.clear_memo()
        state.full.clear_memo()
        f.seek(0)
        f.truncate()
        state.buffers = []
        state.busy = False


def describe_unpicklable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Name the first argument that cannot be pickled, for a useful error."""
    for i, value in enumerate(args):
        err = _pickle_error(value)
        if err is not None:
            return f"argument {i} ({type(value).__qualname__}): {err}"
    for key, value in kwargs.items():
        err = _pickle_error(value)
        if err is not None:
            return f"keyword argument {key!r} ({type(value).__qualname__}): {err}"
    return "an argument could not be pickled"


def _pickle_error(value: Any) -> str | None:
    try:
        cloudpickle.dumps(value, protocol=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
