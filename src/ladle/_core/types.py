"""Messages that cross layers: ids, request metadata and routing snapshots.

Everything here is a frozen, slotted dataclass or a plain constant; nothing
here does I/O.  A request's metadata is a tuple (layout below) because it is
built once per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Methods of the replica itself (not of the user object); user methods can't
# start with this prefix, so the two never collide.
SYSTEM_PREFIX = "__ladle_"


@dataclass(frozen=True, slots=True)
class DeploymentID:
    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"{self.app_name}#{self.name}"


# A request's metadata travels as a plain tuple, built once per request:
#   (request_id, method, multiplexed_model_id, stream, route)
# Indexes into it are used on the hot path instead of a class with attributes.


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One live replica as routers see it."""

    replica_id: str
    address: str
    max_ongoing_requests: int
    multiplexed_model_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DeploymentSnapshot:
    """The routable state of a deployment, published by the controller."""

    deployment_id: DeploymentID
    replicas: tuple[ReplicaInfo, ...] = ()
    max_queued_requests: int = -1
    # False once the deployment is deleted: routers fail calls instead of waiting.
    exists: bool = True


@dataclass(frozen=True, slots=True)
class RouteTable:
    """route prefix -> (app name, ingress deployment), published by the controller."""

    routes: tuple[tuple[str, DeploymentID], ...] = ()
    version: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    ongoing_requests: int
    multiplexed_model_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ReplicaContext:
    """What ``serve.get_replica_context()`` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    replica_id: Any = None
    servable_object: Any = field(default=None, compare=False, repr=False)
