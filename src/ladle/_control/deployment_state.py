"""One deployment's replicas, driven toward its target: start, check, replace, roll.

A replica is STARTING (process up, constructor running), RUNNING (routable),
or STOPPING (drained, then stopped).  Only RUNNING replicas are published to
routers.  A new version starts its replicas first and stops an old one for
each new one that becomes ready, so capacity never dips during an update.
A ``user_config`` change alone reconfigures replicas in place.

A restarted controller hands ``adopt`` the replicas its predecessor
recorded: those that still answer become RUNNING again as they are (same
process, same address), the others are forgotten and replaced by the
ordinary reconcile.  ``on_change`` is called whenever the set of replicas
changes, so the controller can persist it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .._core.errors import DeploymentFailedError, RemoteTraceback, user_traceback
from .._core.snapshots import hub
from .._core.transport import Backend, Remote, connect
from .._core.types import DeploymentID, DeploymentSnapshot, ReplicaInfo, ReplicaStats
from .._serving.replica import Replica, ReplicaSpec
from .autoscaling import AutoscalingPolicy, AutoscalingState

logger = logging.getLogger("ladle")

STARTING, RUNNING, STOPPING = "STARTING", "RUNNING", "STOPPING"
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class DeploymentTarget:
    """The desired state of one deployment, as the API layer hands it down."""

    deployment_id: DeploymentID
    serialized_callable: bytes
    serialized_init: bytes
    is_function: bool
    code_version: str
    num_replicas: int = 1
    autoscaling: AutoscalingPolicy | None = None
    max_ongoing_requests: int = 5
    max_queued_requests: int = -1
    user_config: Any = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    graceful_shutdown_wait_loop_s: float = 2.0
    start_timeout_s: float = 60.0
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class ReplicaRecord:
    replica_id: str
    code_version: str
    state: str = STARTING
    address: str = ""
    remote: Remote | None = None
    pid: int | None = None
    model_ids: frozenset[str] = frozenset()
    ongoing: int = 0
    started_at: float = field(default_factory=time.time)


class DeploymentState:
    """Reconciles one deployment; all methods run on the controller's loop."""

    def __init__(self, target: DeploymentTarget, backend: Backend, controller_address: str,
                 *, on_change: Any = None, adopting: bool = False,
                 target_num: int | None = None) -> None:
        self.target = target
        self._on_change = on_change
        self.deployment_id = target.deployment_id
        self._backend = backend
        self._controller_address = controller_address
        self.replicas: dict[str, ReplicaRecord] = {}
        self.target_num = (target.autoscaling.initial() if target.autoscaling
                           else target.num_replicas) if target_num is None else target_num
        self._autoscaler = AutoscalingState(target.autoscaling) if target.autoscaling else None
        self.status = "UPDATING"
        self.message = ""
        self.failed_error: BaseException | None = None
        self._consecutive_failures = 0
        self._ever_ready = False
        self._retry_at = 0.0
        self._ready_waiters: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._deleted = False
        # Until ``adopt`` has run, reconciling would start replicas that already exist.
        self._adopting = adopting
        self._spawn(self._reconcile_loop())
        self._spawn(self._monitor_loop())
        self._kick()

    # ------------------------------------------------------------------ targets

    async def apply(self, target: DeploymentTarget) -> None:
        """Move to a new target; returns once its replicas are ready (or raises)."""
        old = self.target
        self.target = target
        if target.autoscaling != old.autoscaling:
            self._autoscaler = AutoscalingState(target.autoscaling) if target.autoscaling else None
        if target.autoscaling is None:
            self.target_num = target.num_replicas
        elif old.autoscaling is None:
            self.target_num = target.autoscaling.initial()
        # A deploy that failed is tried again, even with the same code: what made the
        # constructor fail (a missing file, a busy port) may have been fixed since.
        if target.code_version != old.code_version or self.failed_error is not None:
            self._ever_ready = False
            self._consecutive_failures = 0
            self.failed_error = None
            self._retry_at = 0.0
            self.status = "UPDATING"
        elif target.user_config != old.user_config:
            await self._reconfigure_all(target.user_config)
        self._publish()
        self._kick()
        await self.wait_ready()

    async def _reconfigure_all(self, user_config: Any) -> None:
        calls = [r.remote.call("__ladle_reconfigure__", user_config)
                 for r in self.replicas.values() if r.state == RUNNING and r.remote is not None]
        await asyncio.gather(*calls)

    def wait_ready(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ready_waiters.append(fut)
        self._check_ready()
        return fut

    def _check_ready(self) -> None:
        if self.failed_error is not None:
            waiters, self._ready_waiters = self._ready_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(self.failed_error)
            return
        current = [r for r in self.replicas.values()
                   if r.state == RUNNING and r.code_version == self.target.code_version]
        if len(current) >= self.target_num:
            self.status = "HEALTHY"
            self.message = ""
            waiters, self._ready_waiters = self._ready_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    # --------------------------------------------------------------- reconcile

    def _kick(self) -> None:
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while not self._deleted:
            await self._wake.wait()
            self._wake.clear()
            self._reconcile()

    def _reconcile(self) -> None:
        if self._adopting:
            return
        version = self.target.code_version
        live = [r for r in self.replicas.values() if r.state != STOPPING]
        current = [r for r in live if r.code_version == version]
        old = [r for r in live if r.code_version != version]
        missing = self.target_num - len(current)
        if missing > 0 and self.failed_error is None:
            now = time.monotonic()
            if now < self._retry_at:
                self._spawn(self._kick_later(self._retry_at - now))
            else:
                for _ in range(missing):
                    self._start_replica()
        elif missing < 0:
            # Stop the newest surplus first: starting ones have done the least work.
            surplus = sorted(current, key=lambda r: r.state == RUNNING)[:-missing]
            for rec in surplus:
                self._spawn(self._stop_replica(rec, graceful=True))
        ready_new = sum(1 for r in current if r.state == RUNNING)
        # Keep old replicas serving until the new ones can take over.
        keep_old = max(0, min(len(old), self.target_num - ready_new))
        for rec in sorted(old, key=lambda r: r.state == RUNNING)[:len(old) - keep_old]:
            self._spawn(self._stop_replica(rec, graceful=True))
        self._check_ready()

    async def _kick_later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._kick()

    def _start_replica(self) -> None:
        replica_id = f"{self.deployment_id.name}-{uuid.uuid4().hex[:8]}"
        rec = ReplicaRecord(replica_id=replica_id, code_version=self.target.code_version)
        self.replicas[replica_id] = rec
        if self._on_change is not None:
            self._on_change()
        self._spawn(self._run_start(rec, self.target))

    async def _run_start(self, rec: ReplicaRecord, target: DeploymentTarget) -> None:
        spec = ReplicaSpec(
            deployment_id=target.deployment_id, replica_id=rec.replica_id,
            serialized_callable=target.serialized_callable,
            serialized_init=target.serialized_init, is_function=target.is_function,
            max_ongoing_requests=target.max_ongoing_requests, user_config=target.user_config,
            controller_address=self._controller_address, extras=target.extras)
        try:
            rec.address = await self._backend.spawn(
                functools.partial(Replica, spec), name=rec.replica_id, on_exit=self._on_exit)
            rec.remote = await connect(rec.address)
            info = await asyncio.wait_for(rec.remote.call("__ladle_ready__"),
                                          target.start_timeout_s)
        except Exception as exc:
            self._on_start_failed(rec, exc)
            return
        self._started(rec, info)

    def _started(self, rec: ReplicaRecord, info: dict[str, Any]) -> None:
        if rec.state != STARTING:
            return  # stopped while starting
        rec.pid = info.get("pid")
        rec.state = RUNNING
        self._consecutive_failures = 0
        self._ever_ready = True
        self._publish()
        self._kick()

    async def adopt(self, records: list[dict[str, Any]], *, wait_s: float = 2.0) -> None:
        """Take back the replicas a previous controller recorded (before the first
        reconcile): connect to each one still alive; those ready within ``wait_s`` are
        RUNNING when this returns, the others finish starting in the background."""
        async def take(record: dict[str, Any]) -> None:
            replica_id = record["replica_id"]
            address = await self._backend.adopt(replica_id, on_exit=self._on_exit)
            if address is None:
                return
            rec = ReplicaRecord(replica_id, record["code_version"], address=address)
            self.replicas[replica_id] = rec
            try:
                rec.remote = await connect(address)
                ready = asyncio.ensure_future(rec.remote.call("__ladle_ready__"))
            except Exception:
                self._spawn(self._stop_replica(rec, graceful=False))
                return
            done, _ = await asyncio.wait([ready], timeout=wait_s)
            if done:
                self._adopted(rec, ready)
            else:
                ready.add_done_callback(functools.partial(self._adopted, rec))

        await asyncio.gather(*(take(r) for r in records))
        if any(r.state == RUNNING for r in self.replicas.values()):
            self._ever_ready = True
        self._adopting = False
        self._publish()
        self._kick()

    def _adopted(self, rec: ReplicaRecord, ready: asyncio.Future[Any]) -> None:
        if ready.cancelled() or ready.exception() is not None:
            if rec.state == STARTING:
                self._spawn(self._stop_replica(rec, graceful=False))
            return
        self._started(rec, ready.result())

    def _on_start_failed(self, rec: ReplicaRecord, exc: BaseException) -> None:
        if rec.state == STOPPING or self._deleted:
            return
        self._spawn(self._stop_replica(rec, graceful=False))
        remote_tb = exc.__cause__.tb if isinstance(exc.__cause__, RemoteTraceback) else None
        detail = remote_tb or user_traceback(exc)
        self.message = (f"Replica {rec.replica_id} of deployment '{self.deployment_id.name}' "
                        f"failed to start:\n{detail}")
        self._consecutive_failures += 1
        if not self._ever_ready:
            # A deploy in progress fails as a whole: serve.run raises with the user's traceback.
            self.status = "DEPLOY_FAILED"
            # The message holds the user's traceback; chaining would print it twice.
            self.failed_error = DeploymentFailedError(self.message)
            for other in list(self.replicas.values()):
                if other.state == STARTING and other is not rec:
                    self._spawn(self._stop_replica(other, graceful=False))
            self._check_ready()
        else:
            self.status = "UNHEALTHY"
            backoff = min(0.5 * 2 ** (self._consecutive_failures - 1), _MAX_BACKOFF_S)
            self._retry_at = time.monotonic() + backoff
            logger.warning("%s; retrying in %.1fs", self.message.splitlines()[0], backoff)
        self._kick()

    def _on_exit(self, replica_id: str) -> None:
        rec = self.replicas.get(replica_id)
        if rec is None:
            return
        if rec.state == RUNNING:
            logger.warning("Replica %s of deployment '%s' died; starting a replacement.",
                           replica_id, self.deployment_id.name)
            self.status = "UPDATING"
        if rec.state != STARTING:
            del self.replicas[replica_id]
            self._spawn(_close(rec.remote))
            self._publish()
        self._kick()

    async def _stop_replica(self, rec: ReplicaRecord, *, graceful: bool) -> None:
        if rec.state == STOPPING:
            return
        was_running = rec.state == RUNNING
        rec.state = STOPPING
        if was_running:
            self._publish()
        timeout_s = self.target.graceful_shutdown_timeout_s
        # While the deployment lives on (rolling update, downscale), routers elsewhere
        # may not have the new replica set yet: wait until the replica stays idle
        # for a while.  When the deployment goes away, routers fail fast instead.
        quiet_s = 0.0 if self._deleted else self.target.graceful_shutdown_wait_loop_s
        if graceful and was_running and rec.remote is not None and not rec.remote.closed:
            try:
                await asyncio.wait_for(rec.remote.call("__ladle_drain__", timeout_s, quiet_s),
                                       timeout_s + 1.0)
            except Exception:
                pass
        await self._backend.stop(rec.replica_id, timeout_s=2.0)
        await _close(rec.remote)
        self.replicas.pop(rec.replica_id, None)
        if self._on_change is not None:
            self._on_change()
        self._kick()

    # ----------------------------------------------------------------- monitor

    async def _monitor_loop(self) -> None:
        last_health = time.monotonic()
        while not self._deleted:
            policy = self.target.autoscaling
            tick = min(self.target.health_check_period_s,
                       policy.metrics_interval_s if policy else 1.0, 1.0)
            await asyncio.sleep(tick)
            running = [r for r in self.replicas.values() if r.state == RUNNING and r.remote]
            if not running:
                continue
            now = time.monotonic()
            if now - last_health >= self.target.health_check_period_s:
                last_health = now
                await asyncio.gather(*(self._check_health(r) for r in running))
            await self._poll_stats(running, now)

    async def _check_health(self, rec: ReplicaRecord) -> None:
        assert rec.remote is not None
        try:
            await asyncio.wait_for(rec.remote.call("__ladle_health__"),
                                   self.target.health_check_timeout_s)
        except Exception as exc:
            if rec.state != RUNNING:
                return
            logger.warning("Replica %s failed its health check (%r); replacing it.",
                           rec.replica_id, exc)
            self.status = "UNHEALTHY"
            self.message = f"Replica {rec.replica_id} failed a health check: {exc!r}"
            await self._stop_replica(rec, graceful=False)

    async def _poll_stats(self, running: list[ReplicaRecord], now: float) -> None:
        results = await asyncio.gather(*(r.remote.call("__ladle_stats__")  # type: ignore[union-attr]
                                         for r in running), return_exceptions=True)
        changed = False
        total = 0.0
        for rec, stats in zip(running, results, strict=True):
            if isinstance(stats, ReplicaStats):
                rec.ongoing = stats.ongoing_requests
                total += stats.ongoing_requests
                if stats.multiplexed_model_ids != rec.model_ids:
                    rec.model_ids = stats.multiplexed_model_ids
                    changed = True
        if changed:
            self._publish()
        if self._autoscaler is not None and self.failed_error is None:
            decided = self._autoscaler.decide(now, self.target_num, total)
            if decided != self.target_num:
                logger.info("Autoscaling deployment '%s' from %d to %d replicas.",
                            self.deployment_id.name, self.target_num, decided)
                self.target_num = decided
                self._kick()

    # ----------------------------------------------------------------- publish

    def snapshot(self) -> DeploymentSnapshot:
        replicas = tuple(
            ReplicaInfo(r.replica_id, r.address, self.target.max_ongoing_requests, r.model_ids)
            for r in self.replicas.values() if r.state == RUNNING)
        return DeploymentSnapshot(self.deployment_id, replicas, self.target.max_queued_requests)

    def _publish(self) -> None:
        if not self._deleted:
            hub.publish(self.deployment_id, self.snapshot())
        if self._on_change is not None:
            self._on_change()

    def replica_records(self) -> list[dict[str, Any]]:
        """What a restarted controller needs to find this deployment's replicas again."""
        return [{"replica_id": r.replica_id, "code_version": r.code_version}
                for r in self.replicas.values() if r.state != STOPPING]

    def replica_details(self) -> list[dict[str, Any]]:
        current = self.target.code_version
        return [{"replica_id": r.replica_id, "state": r.state, "pid": r.pid,
                 "start_time_s": r.started_at, "current": r.code_version == current}
                for r in self.replicas.values()]

    def replica_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for rec in self.replicas.values():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    async def delete(self) -> None:
        """Stop every replica (draining running ones) and forget the deployment."""
        self.target = replace(self.target, num_replicas=0, autoscaling=None)
        self._deleted = True
        hub.publish(self.deployment_id, DeploymentSnapshot(self.deployment_id, exists=False))
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._stop_replica(r, graceful=True)
                               for r in list(self.replicas.values())), return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _close(remote: Remote | None) -> None:
    if remote is not None:
        await remote.aclose()
