"""What user code can ask about where it runs: replica context, multiplexed model id."""

from __future__ import annotations

from .._core.context import current_replica
from .._core.errors import LadleError
from .._core.types import ReplicaContext
from .multiplex import get_multiplexed_model_id


def get_replica_context() -> ReplicaContext:
    """The replica's app name, deployment name and replica tag (inside a deployment only)."""
    ctx = current_replica()
    if ctx is None:
        raise LadleError("`serve.get_replica_context()` may only be called from within a "
                         "ladle deployment.")
    return ctx


__all__ = ["get_multiplexed_model_id", "get_replica_context"]
