"""How values cross a process boundary: pickle protocol 5, through cloudpickle when needed.

cloudpickle ships classes and functions defined in ``__main__``, a notebook
or a test function by value; plain builtin values (most requests) go through
the C pickler alone, which is several times cheaper.  Large buffers (NumPy
arrays, bytearray, memoryview, PyTorch CPU tensors, and top-level ``bytes``
through ``out_of_band``) go out of band, so the transport can hand them over
in shared memory or write them without another copy.  ``snapshot`` pickles a
value at once, for a request that leaves later (copy-on-send).  Loading is
plain ``pickle.loads`` — only ever on bytes from another ladle process, never
on bytes from an HTTP client.

Everything ladle pickles with cloudpickle goes through ``CodePickler``, which
keeps each code object's file name (see ``_reduce_code``).
"""

from __future__ import annotations

import io
import pickle
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Callable
from typing import Any

import cloudpickle

from . import shared_memory

# Buffers smaller than this are copied into the pickle: cheaper than framing them, and
# a copy made now is what copy-on-send needs.  Larger ones go through shared memory.
_OUT_OF_BAND_MIN_BYTES = shared_memory.MIN_BYTES
# Values that cannot change after they were sent: no snapshot needed.
_IMMUTABLE = frozenset((int, float, str, bytes, bool, complex, type(None)))


def _view(buffer: Any) -> memoryview:
    return memoryview(buffer).cast("B")


def _rebuild_view(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    view = memoryview(buffer).cast("B")
    return view if fmt == "B" and len(shape) == 1 else view.cast(fmt, shape)  # type: ignore[call-overload]


class OutOfBand:
    """A large ``bytes`` (or any buffer) sent out of band: the C pickler copies a
    ``bytes`` into the pickle, so top-level ones are wrapped in this by the transport.
    ``as_view`` rebuilds a memoryview (HTTP bodies) instead of ``bytes``."""

    __slots__ = ("data", "as_view")

    def __init__(self, data: Any, as_view: bool = False) -> None:
        self.data = data
        self.as_view = as_view

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_view if self.as_view else bytes, (pickle.PickleBuffer(self.data),))


def out_of_band(value: Any) -> Any:
    """``value``, wrapped if it is a large ``bytes`` (the only buffer the C pickler
    never offers out of band)."""
    if type(value) is bytes and len(value) >= _OUT_OF_BAND_MIN_BYTES:
        return OutOfBand(value)
    return value


class Snapshot:
    """A value pickled when ``.remote()`` returned, so later changes by the caller
    don't reach the replica; it unpickles as that value.  Large buffers are copied
    into shared-memory segments, which the transport then lends instead of copying."""

    __slots__ = ("data", "buffers", "segments")

    def __init__(self, data: bytes, buffers: list[Any],
                 segments: list[shared_memory.Segment]) -> None:
        self.data = data
        self.buffers = buffers
        self.segments = segments

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_restore, (self.data, *[pickle.PickleBuffer(b) for b in self.buffers]))

    def __del__(self) -> None:
        for seg in self.segments:
            shared_memory.pool.release_local(seg)


def _restore(data: bytes, *buffers: Any) -> Any:
    return pickle.loads(data, buffers=buffers)


def snapshot(value: Any) -> Any:
    """``value`` as it is now: itself if it cannot change, else a ``Snapshot``.  A value
    that cannot be pickled is returned as is: sending it reports the error."""
    if type(value) in _IMMUTABLE:
        return value
    try:
        data, raws = dumps_oob(value)
    except Exception:
        return value
    buffers: list[Any] = []
    segments: list[shared_memory.Segment] = []
    for buf in raws:
        raw = buf.raw()
        if shared_memory.AVAILABLE:
            seg = shared_memory.pool.copy_of(raw, local=True)
            segments.append(seg)
            buffers.append(seg.view(raw.nbytes))
        else:
            buffers.append(bytes(raw))
    return Snapshot(data, buffers, segments)


def snapshot_arguments(args: tuple[Any, ...], kwargs: dict[str, Any],
                       skip: type | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``snapshot`` of each argument (but those of type ``skip``)."""
    args = tuple([v if skip is not None and isinstance(v, skip) else snapshot(v) for v in args])
    if kwargs:
        kwargs = {k: v if skip is not None and isinstance(v, skip) else snapshot(v)
                  for k, v in kwargs.items()}
    return args, kwargs


def _reduce_special(obj: Any) -> Any:
    """Reductions ladle adds to pickle's: memoryview (unpicklable otherwise) and
    PyTorch CPU tensors (whose own reduction copies the data into the pickle), both
    as out-of-band buffers; None when ``obj`` is none of these."""
    kind = type(obj)
    if kind is memoryview:
        data = obj if obj.c_contiguous else obj.tobytes()
        return (_rebuild_view, (pickle.PickleBuffer(data), obj.format, obj.shape))
    if kind is OutOfBand or kind is Snapshot:
        return obj.__reduce_ex__(5)
    torch = sys.modules.get("torch")
    if torch is not None and kind is torch.Tensor:
        return _reduce_tensor(obj)
    return None


def _reduce_tensor(tensor: Any) -> Any:
    if (tensor.device.type != "cpu" or tensor.requires_grad or tensor.is_sparse
            or not tensor.is_contiguous()):
        return None
    try:
        array = tensor.numpy()
    except (TypeError, RuntimeError):  # a dtype NumPy lacks (bfloat16, ...)
        return None
    return (sys.modules["torch"].from_numpy, (array,))


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
        reduced = _reduce_special(obj)
        if reduced is None:
            raise _NotPlain
        return reduced


class _FullPickler(CodePickler):
    """``CodePickler``, with ladle's reductions first."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduce_special(obj)
        if reduced is not None:
            return reduced
        return super().reducer_override(obj)


class _Picklers(threading.local):
    """The picklers of one thread, reused: building one costs more than using it."""

    def __init__(self) -> None:
        self.file = io.BytesIO()
        self.buffers: list[pickle.PickleBuffer] = []
        self.plain = _PlainPickler(self.file, protocol=5, buffer_callback=self._keep)
        self.full = _FullPickler(self.file, protocol=5, buffer_callback=self._keep)
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

        def keep(buf: pickle.PickleBuffer) -> bool:
            if buf.raw().nbytes >= _OUT_OF_BAND_MIN_BYTES:
                buffers.append(buf)
                return False
            return True

        file = io.BytesIO()
        _FullPickler(file, protocol=5, buffer_callback=keep).dump(obj)
        return file.getvalue(), buffers
    state.busy = True
    f = state.file
    try:
        try:
            state.plain.dump(obj)
        except _NotPlain:
            state.plain.clear_memo()
            f.seek(0)
            f.truncate()
            state.buffers = []
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
