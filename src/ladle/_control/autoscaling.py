"""The autoscaling policy: how many replicas a deployment should have now.

Pure and clocked from outside (``now`` is an argument), so it is tested
with a fake clock.  The controller feeds it the ongoing requests reported by
the replicas; it answers with a replica count that respects min/max and only
changes after the want to scale has lasted ``upscale_delay_s`` /
``downscale_delay_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AutoscalingPolicy:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    metrics_interval_s: float = 10.0

    def initial(self) -> int:
        start = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        return max(start, 1) if self.max_replicas >= 1 else 0


class AutoscalingState:
    """Remembers since when scaling up or down has been wanted."""

    def __init__(self, policy: AutoscalingPolicy) -> None:
        self.policy = policy
        self._want_up_since: float | None = None
        self._want_down_since: float | None = None

    def desired(self, current: int, total_ongoing: float) -> int:
        """The count the load asks for, before any delay."""
        p = self.policy
        if current == 0:
            return max(p.min_replicas, 1 if total_ongoing > 0 else 0)
        raw = total_ongoing / p.target_ongoing_requests
        change = raw - current
        factor = p.upscaling_factor if change > 0 else p.downscaling_factor
        wanted = math.ceil(current + change * factor - 1e-9)
        return min(max(wanted, p.min_replicas), p.max_replicas)

    def decide(self, now: float, current: int, total_ongoing: float) -> int:
        wanted = self.desired(current, total_ongoing)
        p = self.policy
        if wanted > current:
            self._want_down_since = None
            if self._want_up_since is None:
                self._want_up_since = now
            if now - self._want_up_since >= p.upscale_delay_s:
                self._want_up_since = None
                return wanted
        elif wanted < current:
            self._want_up_since = None
            if self._want_down_since is None:
                self._want_down_since = now
            if now - self._want_down_since >= p.downscale_delay_s:
                self._want_down_since = None
                return wanted
        else:
            self._want_up_since = self._want_down_since = None
        return current
