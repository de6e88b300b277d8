"""How values cross a process boundary: pickle protocol 5, through cloudpickle when needed.

cloudpickle ships classes and functions defined in ``__main__``, a notebook
or a test function by value; plain builtin values (most requests) go through
the C pickler alone, which is several times cheaper.  Large buffers (bytes, NumPy arrays) go out of band so
the transport can write them without another copy.  Loading is plain
``pickle.loads`` — only ever on bytes from another ladle process, never on
bytes from an HTTP client.

Everything ladle pickles with cloudpickle goes through ``CodePickler``, which
keeps each code object's file name (see ``_reduce_code``).
"""

from __future__ import annotations

import io
import pickle
import threading
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle

# Buffers smaller than this are cheaper to copy into the pickle than to frame.
_OUT_OF_BAND_MIN_BYTES = 64 * 1024


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    """cloudpickle's reduction of a code object, with the code's own file name.

    cloudpickle 3.1.3 replaced every shipped code object's ``co_filename`` with
    ``<dynamic-code>`` (for deterministic payloads), so a traceback from a class
    defined in ``__main__``, a notebook or a test function lost its file, line
    text and source.  Ship the name beside cloudpickle's arguments and put it
    back on load; on versions that keep it, this changes nothing.
    """
    ctor, args = _CLOUDPICKLE_CODE_REDUCE(code)
    if ctor is not types.CodeType:  # a cloudpickle we don't know: trust it
        return ctor, args
    return _rebuild_code, (args, code.co_filename)


def _rebuild_code(args: tuple[Any, ...], filename: str) -> types.CodeType:
    code = types.CodeType(*args)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


_CLOUDPICKLE_CODE_REDUCE: Callable[[types.CodeType], Any] = \
    cloudpickle.Pickler.dispatch_table[types.CodeType]


class CodePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle's Pickler, keeping code objects' file names (``_reduce_code``)."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table)


def dumps(obj: Any, *, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None
          ) -> bytes:
    """``cloudpickle.dumps`` (protocol 5) through ``CodePickler``."""
    f = io.BytesIO()
    CodePickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


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
        self.full = CodePickler(self.file, protocol=5, buffer_callback=self._keep)
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
        data = dumps(obj, buffer_callback=buffers.append)
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
        dumps(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
