"""Replica choice policies: power of two choices, with multiplexed-model affinity.

Pure functions over the router's slots (anything with ``in_flight``,
``capacity`` and ``model_ids``), so they are tested without processes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar


class SlotLike(Protocol):
    in_flight: int
    capacity: int
    model_ids: Any


S = TypeVar("S", bound=SlotLike)

_random = random.random


def choose_replica(slots: Sequence[S], model_id: str = "") -> S | None:
    """The less loaded of two random replicas with room, or None if all are full.

    With a multiplexed model id, replicas that already hold the model are
    preferred; if none of them has room, any replica with room is used.
    """
    n = len(slots)
    if n == 1:
        only = slots[0]
        return only if only.in_flight < only.capacity else None
    if n == 0:
        return None
    if model_id:
        holders = [s for s in slots if model_id in s.model_ids and s.in_flight < s.capacity]
        if holders:
            return _two_choices(holders)
    return _two_choices([s for s in slots if s.in_flight < s.capacity])


def _two_choices(candidates: list[S]) -> S | None:
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0]
    i = int(_random() * n)
    j = int(_random() * (n - 1))
    if j >= i:
        j += 1
    a, b = candidates[i], candidates[j]
    return a if a.in_flight <= b.in_flight else b
