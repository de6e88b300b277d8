"""``ladle.get`` and ``ladle.wait``: ``ray.get``/``ray.wait`` for what handles return."""

from __future__ import annotations

import time
from typing import Any

from .._serving.by_reference import ObjectRef
from .._serving.handle import DeploymentResponse

_REFS = (DeploymentResponse, ObjectRef)


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """The value of a response (or a list of their values), blocking.

    Example:
        ``ladle.get(handle.remote("hi"))`` or ``ladle.get([h.remote(1), h.remote(2)])``
    """
    if isinstance(refs, list | tuple):
        deadline = None if timeout is None else time.monotonic() + timeout
        return [_get_one(r, deadline) for r in refs]
    return _get_one(refs, None if timeout is None else time.monotonic() + timeout)


def _get_one(ref: Any, deadline: float | None) -> Any:
    if not isinstance(ref, _REFS):
        raise TypeError(f"ladle.get() takes what a handle's `.remote()` returns (or an "
                        f"ObjectRef), got {type(ref).__name__}.")
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    return ref.result(timeout_s=remaining)


def wait(refs: list[Any], *, num_returns: int = 1, timeout: float | None = None,
         fetch_local: bool = True) -> tuple[list[Any], list[Any]]:
    """Split ``refs`` into (ready, not ready) once ``num_returns`` are ready or at ``timeout``."""
    if not isinstance(refs, list):
        raise TypeError(f"ladle.wait() takes a list of responses, got {type(refs).__name__}.")
    for ref in refs:
        if not isinstance(ref, _REFS):
            raise TypeError(f"ladle.wait() takes responses, got {type(ref).__name__}.")
    if not 0 <= num_returns <= len(refs):
        raise ValueError(f"num_returns must be between 0 and {len(refs)}, got {num_returns}.")
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(refs)
    ready: list[Any] = []
    while len(ready) < num_returns:
        for ref in list(pending):
            if ref._is_done():
                ready.append(ref)
                pending.remove(ref)
        if len(ready) >= num_returns:
            break
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        _wait_any(pending, remaining)
    # As ray.wait: at most num_returns come back ready (the first ones in input
    # order); the rest, ready or not, are in the second list.
    done = set(map(id, ready))
    chosen = [r for r in refs if id(r) in done][:num_returns]
    taken = set(map(id, chosen))
    return chosen, [r for r in refs if id(r) not in taken]


def _wait_any(pending: list[Any], timeout_s: float | None) -> None:
    import concurrent.futures

    futures = [r._wait_future() for r in pending]
    concurrent.futures.wait(futures, timeout=timeout_s,
                            return_when=concurrent.futures.FIRST_COMPLETED)
