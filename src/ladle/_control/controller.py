"""The Controller: applications, routes, and the proxy.

Hard state is the set of applications the user asked for (name, route
prefix, ingress, deployment targets, and for a config deploy the config it
came from); everything else — replicas, their addresses, health — is soft
state kept by each ``DeploymentState``.  A failed ``deploy`` leaves the
application DEPLOY_FAILED with its replicas stopped; it never leaves
half-started processes behind.  All methods run on the controller's event loop.

With a ``StateStore`` (a long-lived instance), the hard state and the replica
records are saved after every change; ``restore`` rebuilds a controller from
them, adopting the replicas and the proxy that are still alive, before the
control socket (``control_server.py``) is opened again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from .._core.errors import LadleError
from .._core.snapshots import ROUTES, hub
from .._core.transport import Backend, Remote, connect
from .._core.types import DeploymentID, DeploymentSnapshot, RouteTable
from .._serving.proxy import Proxy, ProxyConfig
from .control_server import ControlServer
from .deployment_state import DeploymentState, DeploymentTarget
from .store import StateStore, blob_keys, decode_target, encode_target

logger = logging.getLogger("ladle")
_PROXY = "proxy"
_PROXY_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AppTarget:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: tuple[DeploymentTarget, ...]


IMPERATIVE, DECLARATIVE = "imperative", "declarative"


class _App:
    def __init__(self, target: AppTarget, source: str = IMPERATIVE,
                 config: dict[str, Any] | None = None) -> None:
        self.target = target
        self.status = "DEPLOYING"
        self.message = ""
        self.deployments: dict[str, DeploymentState] = {}
        self.source = source  # from serve.run (imperative) or a config file (declarative)
        self.config = config  # the application's part of that config file
        self.deployed_at = time.time()


class Controller:
    """Owns the desired state and drives replicas toward it through a Backend."""

    def __init__(self, backend: Backend, store: StateStore | None = None) -> None:
        self.backend = backend
        self._store = store
        self._save_scheduled = False
        self.address = ""
        self._apps: dict[str, _App] = {}
        self._closed = False
        self._shut_down = asyncio.Event()
        self._open = asyncio.Event()
        self._proxy_config: ProxyConfig | None = None
        self._proxy: Remote | None = None
        self.http_port: int | None = None
        self._proxy_tasks: set[asyncio.Task[None]] = set()
        self._routes_version = 0

    async def start(self, *, restoring: bool = False) -> None:
        """Open the control socket.  ``restoring``: answer nothing on it until ``restore``
        has run (callers wait), so no process ever sees a half-restored instance."""
        self._open = asyncio.Event()
        if not restoring:
            self._open.set()
        self.address = await self.backend.listen(ControlServer(self), name="controller")
        self._publish_routes()

    async def wait_open(self) -> None:
        await self._open.wait()

    # -------------------------------------------------------------- applications

    async def deploy(self, target: AppTarget, *, source: str = IMPERATIVE,
                     config: dict[str, Any] | None = None) -> None:
        """Create or update an application; return once all its replicas are ready."""
        if self._closed:
            raise LadleError("This ladle instance is shutting down.")
        self._check_route_prefix(target)
        app = self._apps.get(target.name)
        if app is None:
            app = self._apps[target.name] = _App(target, source, config)
        app.target, app.source, app.config = target, source, config
        app.deployed_at = time.time()
        app.status, app.message = "DEPLOYING", ""
        self._publish_routes()
        self._changed()
        wanted = {d.deployment_id.name for d in target.deployments}
        removed = [name for name in app.deployments if name not in wanted]
        for name in removed:
            await app.deployments.pop(name).delete()
        waits: list[Any] = []
        for dtarget in target.deployments:
            state = app.deployments.get(dtarget.deployment_id.name)
            if state is None:
                state = self._new_state(dtarget)
                app.deployments[dtarget.deployment_id.name] = state
                state._publish()
                waits.append(state.wait_ready())
            else:
                waits.append(state.apply(dtarget))
        await self._settle(app, waits)
        await self.sync_proxy()

    def _new_state(self, target: DeploymentTarget, **options: Any) -> DeploymentState:
        return DeploymentState(target, self.backend, self._replica_link_address(),
                               on_change=self._changed, **options)

    async def _settle(self, app: _App, waits: list[Any]) -> None:
        """Wait for an application's deployments to be ready; RUNNING or DEPLOY_FAILED."""
        try:
            await asyncio.gather(*waits)
        except BaseException as exc:
            app.status = "DEPLOY_FAILED"
            app.message = str(exc)
            for state in app.deployments.values():
                if state.status != "DEPLOY_FAILED":
                    state.target_num = 0
                    state._kick()
            self._changed()
            raise
        if self._apps.get(app.target.name) is app:
            app.status = "RUNNING"
        self._publish_routes()
        self._changed()

    def check_config(self, apps: dict[str, tuple[AppTarget, dict[str, Any]]]) -> list[str]:
        """Raise if deploying ``apps`` as a whole config can't work (a route prefix taken by
        an application that stays); return the applications it would delete."""
        if self._closed:
            raise LadleError("This ladle instance is shutting down.")
        removed = [name for name, app in self._apps.items()
                   if app.source == DECLARATIVE and name not in apps]
        for target, _ in apps.values():
            if target.route_prefix is None:
                continue
            for other in self._apps.values():
                if (other.target.name not in apps and other.target.name not in removed
                        and other.target.route_prefix == target.route_prefix):
                    error = LadleError(
                        f"Prefix {target.route_prefix} is being used by application "
                        f"'{other.target.name}'. Failed to deploy application "
                        f"'{target.name}'.")
                    error.app_name = target.name  # type: ignore[attr-defined]
                    raise error
        return removed

    async def apply_config(self, apps: dict[str, tuple[AppTarget, dict[str, Any]]]) -> None:
        """Deploy a whole config: its applications (built and checked by the caller) are
        created or updated; applications a previous config deployed that this one lacks
        are deleted (those from ``serve.run`` stay).  Nothing changes if a route prefix
        clashes with an application that stays.  Returns once every one is ready."""
        removed = self.check_config(apps)
        await asyncio.gather(*(self.delete(name) for name in removed))
        results = await asyncio.gather(
            *(self.deploy(target, source=DECLARATIVE, config=config)
              for target, config in apps.values()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _replica_link_address(self) -> str:
        # Replicas in this very process read the controller's hub directly.
        return "" if getattr(self.backend, "in_process", False) else self.address

    def _check_route_prefix(self, target: AppTarget) -> None:
        if target.route_prefix is None:
            return
        for other in self._apps.values():
            if other.target.name != target.name and other.target.route_prefix == target.route_prefix:
                raise LadleError(
                    f"Prefix {target.route_prefix} is being used by application "
                    f"'{other.target.name}'. Failed to deploy application '{target.name}'.")

    async def delete(self, name: str) -> None:
        app = self._apps.pop(name, None)
        if app is None:
            return
        app.status = "DELETING"
        self._publish_routes()
        self._changed()
        await self.sync_proxy()
        await asyncio.gather(*(s.delete() for s in app.deployments.values()))

    @property
    def closed(self) -> bool:
        """True once shutdown has begun (from this process or over the control socket)."""
        return self._closed

    async def shutdown(self) -> None:
        self._closed = True
        if self._store is not None:
            # Killed half way, the restarted controller finishes the job.
            self._store.save({"version": 1, "shutting_down": True, "apps": {}})
        for task in list(self._proxy_tasks):
            task.cancel()
        # The proxy and the replicas drain side by side: an HTTP request in flight
        # needs both until it finishes.
        drain_s = max((state.target.graceful_shutdown_timeout_s for app in self._apps.values()
                       for state in app.deployments.values()), default=0.0)
        await asyncio.gather(self._stop_proxy(drain_s),
                             *(self.delete(name) for name in list(self._apps)))
        await self.backend.aclose()
        self._shut_down.set()

    async def wait_closed(self) -> None:
        """Return once ``shutdown`` (called from anywhere) has finished."""
        await self._shut_down.wait()

    # ------------------------------------------------------------------- proxy

    async def start_proxy(self, config: ProxyConfig) -> int:
        """Start the HTTP proxy; return its port. Raises if it can't listen."""
        config = dataclasses.replace(config, controller_address=self._replica_link_address())
        port = await self._spawn_proxy(config)
        # A restarted proxy must come back on the same port, even if 0 was asked for.
        self._proxy_config = dataclasses.replace(config, port=port)
        self._changed()
        return port

    def start_proxy_soon(self, config: ProxyConfig) -> None:
        """Start the proxy without waiting for it; failing to listen is only logged."""
        async def start() -> None:
            try:
                port = await self.start_proxy(config)
            except LadleError as exc:
                logger.warning("%s Applications are reachable from Python only.", exc)
            else:
                logger.info("HTTP proxy listening on http://%s:%d", config.host, port)

        task = asyncio.get_running_loop().create_task(start())
        self._proxy_tasks.add(task)
        task.add_done_callback(self._proxy_tasks.discard)

    async def _spawn_proxy(self, config: ProxyConfig) -> int:
        address = await self.backend.spawn(functools.partial(Proxy, config), name=_PROXY,
                                           on_exit=self._on_proxy_exit)
        return await self._connect_proxy(address)

    async def _connect_proxy(self, address: str) -> int:
        remote = await connect(address)
        try:
            info = await asyncio.wait_for(remote.call("__ladle_ready__"), _PROXY_START_TIMEOUT_S)
        except BaseException:
            await remote.aclose()
            await self.backend.stop(_PROXY, timeout_s=2.0)
            raise
        self._proxy = remote
        self.http_port = int(info["port"])
        return self.http_port

    def _on_proxy_exit(self, name: str) -> None:
        self._proxy = None
        if self._closed or self._proxy_config is None:
            return
        logger.warning("The HTTP proxy exited; restarting it on port %s.", self.http_port)
        task = asyncio.get_running_loop().create_task(self._restart_proxy(self._proxy_config))
        self._proxy_tasks.add(task)
        task.add_done_callback(self._proxy_tasks.discard)

    async def _restart_proxy(self, config: ProxyConfig) -> None:
        for attempt in range(20):
            if self._closed or self._proxy_config is not config:
                return
            try:
                await self._spawn_proxy(config)
                return
            except Exception as exc:
                logger.warning("Restarting the HTTP proxy failed (%s); retrying.", exc)
                await asyncio.sleep(min(0.2 * 2 ** attempt, 5.0))

    async def _stop_proxy(self, drain_s: float) -> None:
        """Stop accepting, let requests in flight finish (up to ``drain_s``), then stop."""
        self._proxy_config = None
        remote, self._proxy = self._proxy, None
        if remote is not None:
            exited = asyncio.Event()
            remote.add_close_callback(exited.set)
            try:
                await asyncio.wait_for(remote.call("__ladle_stop__"), 5.0)
                # uvicorn closes its socket, finishes the responses under way, and the
                # process exits; past the deadline it is stopped below.
                await asyncio.wait_for(exited.wait(), drain_s + 1.0)
            except Exception:
                pass
            await remote.aclose()
        await self.backend.stop(_PROXY, timeout_s=5.0)

    # --------------------------------------------------------------- lookups

    def ingress(self, app_name: str) -> DeploymentID:
        app = self._apps.get(app_name)
        if app is None:
            raise LadleError(f"Application '{app_name}' does not exist. "
                             f"Available applications: {sorted(self._apps)}.")
        return DeploymentID(app.target.ingress, app_name)

    def has_deployment(self, deployment_id: DeploymentID) -> bool:
        app = self._apps.get(deployment_id.app_name)
        return app is not None and deployment_id.name in app.deployments

    def status(self) -> dict[str, Any]:
        apps: dict[str, Any] = {}
        for name, app in self._apps.items():
            deployments = {}
            unhealthy = False
            for dname, state in app.deployments.items():
                deployments[dname] = {
                    "status": state.status, "message": state.message,
                    "replica_states": state.replica_states(),
                    "target_num_replicas": state.target_num,
                    "replicas": state.replica_details(),
                    "deployment_config": _deployment_config(state.target),
                }
                unhealthy = unhealthy or state.status == "UNHEALTHY"
            status = app.status
            if status == "RUNNING" and unhealthy:
                status = "UNHEALTHY"
            apps[name] = {"status": status, "message": app.message,
                          "route_prefix": app.target.route_prefix,
                          "ingress": app.target.ingress, "deployments": deployments,
                          "last_deployed_time_s": app.deployed_at, "source": app.source,
                          "config": app.config}
        proxies = {"local": "HEALTHY" if self._proxy is not None else "UNHEALTHY"} \
            if self._proxy_config is not None else {}
        return {"applications": apps, "pids": self.backend.pids(), "proxies": proxies,
                "http_port": self.http_port}

    def _publish_routes(self) -> None:
        routes = tuple(sorted(
            ((app.target.route_prefix, DeploymentID(app.target.ingress, name))
             for name, app in self._apps.items()
             if app.target.route_prefix is not None and app.status != "DELETING"),
            key=lambda item: -len(item[0])))
        self._routes_version += 1
        hub.publish(ROUTES, RouteTable(routes, self._routes_version))

    async def sync_proxy(self) -> None:
        """Wait until the proxy started and routes as the controller does now.

        So that ``serve.run`` returning means the application answers over HTTP.
        """
        if self._proxy_tasks:
            await asyncio.gather(*self._proxy_tasks, return_exceptions=True)
        remote = self._proxy
        if remote is None:
            return
        try:
            await asyncio.wait_for(remote.call("__ladle_routes__", self._routes_version), 10.0)
        except Exception as exc:
            logger.warning("The HTTP proxy did not confirm the new routes: %r", exc)

    def snapshot_for(self, key: Hashable) -> Any:
        value = hub.get(key)
        if value is None and isinstance(key, DeploymentID):
            return DeploymentSnapshot(key, exists=False)
        return value



    # ------------------------------------------------------------- persistence

    def _changed(self) -> None:
        """Save the state at the end of this loop iteration (one write for many changes)."""
        if self._store is None or self._save_scheduled or self._closed:
            return
        self._save_scheduled = True
        asyncio.get_running_loop().call_soon(self._save)

    def _save(self) -> None:
        self._save_scheduled = False
        if self._store is None or self._closed:
            return
        apps: dict[str, Any] = {}
        blobs: set[str] = set()
        for name, app in self._apps.items():
            targets = [encode_target(d, self._store) for d in app.target.deployments]
            for data in targets:
                blobs |= blob_keys(data)
            apps[name] = {
                "route_prefix": app.target.route_prefix, "ingress": app.target.ingress,
                "deployments": targets, "source": app.source, "config": app.config,
                "deployed_at": app.deployed_at, "status": app.status, "message": app.message,
                "replicas": {dname: {"target_num": state.target_num,
                                     "records": state.replica_records()}
                             for dname, state in app.deployments.items()}}
        proxy = None
        if self._proxy_config is not None:
            proxy = {f.name: getattr(self._proxy_config, f.name)
                     for f in dataclasses.fields(self._proxy_config)
                     if f.name not in ("middlewares", "controller_address")}
        self._store.save({"version": 1, "apps": apps, "proxy": proxy})
        self._store.keep_blobs(blobs)

    async def restore(self, state: dict[str, Any]) -> None:
        """Rebuild the state a previous controller saved, adopting the replicas and the
        proxy still alive (stopping any process it started that no record names)."""
        assert self._store is not None
        adoptions = []
        known = {_PROXY, "controller"}
        for name, data in state.get("apps", {}).items():
            targets = tuple(decode_target(d, self._store) for d in data["deployments"])
            app = _App(AppTarget(name, data["route_prefix"], data["ingress"], targets),
                       data["source"], data["config"])
            app.deployed_at, app.status, app.message = (
                data["deployed_at"], data["status"], data["message"])
            for target in targets:
                saved = data["replicas"].get(target.deployment_id.name, {})
                records = saved.get("records", [])
                known |= {r["replica_id"] for r in records}
                dstate = self._new_state(target, adopting=True,
                                         target_num=saved.get("target_num"))
                app.deployments[target.deployment_id.name] = dstate
                adoptions.append(dstate.adopt(records))
            self._apps[name] = app
        if state.get("shutting_down"):
            known = set()
        orphans = [name for name in getattr(self.backend, "live_names", list)()
                   if name not in known]
        await asyncio.gather(*adoptions, *(self._stop_orphan(name) for name in orphans))
        if state.get("proxy") and not state.get("shutting_down"):
            await self._restore_proxy(ProxyConfig(**state["proxy"]))
        for app in self._apps.values():
            if app.status == "DEPLOYING":
                self._spawn_task(self._settle(app, [s.wait_ready()
                                                    for s in app.deployments.values()]))
        self._publish_routes()
        self._open.set()

    async def _stop_orphan(self, name: str) -> None:
        if await self.backend.adopt(name, on_exit=lambda _: None) is not None:
            await self.backend.stop(name, timeout_s=2.0)

    async def _restore_proxy(self, config: ProxyConfig) -> None:
        config = dataclasses.replace(config, controller_address=self._replica_link_address())
        self._proxy_config = config
        address = await self.backend.adopt(_PROXY, on_exit=self._on_proxy_exit)
        if address is not None:
            try:
                await self._connect_proxy(address)
                return
            except Exception as exc:
                logger.warning("The HTTP proxy did not answer (%r); restarting it.", exc)
                await self.backend.stop(_PROXY, timeout_s=2.0)
        self._spawn_task(self._restart_proxy(config))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._proxy_tasks.add(task)
        task.add_done_callback(self._proxy_tasks.discard)


def _deployment_config(target: DeploymentTarget) -> dict[str, Any]:
    """The options in effect, as a config file would write them (Ray's DeploymentSchema)."""
    config: dict[str, Any] = {
        "name": target.deployment_id.name,
        "max_ongoing_requests": target.max_ongoing_requests,
        "max_queued_requests": target.max_queued_requests,
        "user_config": target.user_config,
        "graceful_shutdown_wait_loop_s": target.graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": target.graceful_shutdown_timeout_s,
        "health_check_period_s": target.health_check_period_s,
        "health_check_timeout_s": target.health_check_timeout_s,
    }
    policy = target.autoscaling
    if policy is None:
        config["num_replicas"] = target.num_replicas
    else:
        config["autoscaling_config"] = {
            "min_replicas": policy.min_replicas, "max_replicas": policy.max_replicas,
            "initial_replicas": policy.initial_replicas,
            "target_ongoing_requests": policy.target_ongoing_requests,
            "upscale_delay_s": policy.upscale_delay_s,
            "downscale_delay_s": policy.downscale_delay_s,
            "metrics_interval_s": policy.metrics_interval_s}
    return config
