"""The Controller: applications, routes, and the control socket other processes use.

Hard state is the set of applications the user asked for (name, route
prefix, ingress, deployment targets); everything else — replicas, their
addresses, health — is soft state rebuilt by each ``DeploymentState``.  A
failed ``deploy`` leaves the application DEPLOY_FAILED with its replicas
stopped; it never leaves half-started processes behind.  All methods run on
the controller's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from .._core.errors import LadleError, RequestCancelledError
from .._core.snapshots import ROUTES, hub
from .._core.transport import Backend, Remote, ReplySink, connect
from .._core.types import DeploymentID, DeploymentSnapshot, RouteTable
from .._serving.proxy import Proxy, ProxyConfig
from .deployment_state import DeploymentState, DeploymentTarget

logger = logging.getLogger("ladle")
_PROXY = "proxy"
_PROXY_START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AppTarget:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: tuple[DeploymentTarget, ...]


class _App:
    def __init__(self, target: AppTarget) -> None:
        self.target = target
        self.status = "DEPLOYING"
        self.message = ""
        self.deployments: dict[str, DeploymentState] = {}


class Controller:
    """Owns the desired state and drives replicas toward it through a Backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.address = ""
        self._apps: dict[str, _App] = {}
        self._closed = False
        self._proxy_config: ProxyConfig | None = None
        self._proxy: Remote | None = None
        self.http_port: int | None = None
        self._proxy_tasks: set[asyncio.Task[None]] = set()
        self._routes_version = 0

    async def start(self) -> None:
        self.address = await self.backend.listen(_ControlServer(self), name="controller")
        self._publish_routes()

    # -------------------------------------------------------------- applications

    async def deploy(self, target: AppTarget) -> None:
        """Create or update an application; return once all its replicas are ready."""
        if self._closed:
            raise LadleError("This ladle instance is shutting down.")
        self._check_route_prefix(target)
        app = self._apps.get(target.name)
        if app is None:
            app = self._apps[target.name] = _App(target)
        app.target = target
        app.status, app.message = "DEPLOYING", ""
        self._publish_routes()
        wanted = {d.deployment_id.name for d in target.deployments}
        removed = [name for name in app.deployments if name not in wanted]
        for name in removed:
            await app.deployments.pop(name).delete()
        waits: list[Any] = []
        for dtarget in target.deployments:
            state = app.deployments.get(dtarget.deployment_id.name)
            if state is None:
                state = DeploymentState(dtarget, self.backend, self._replica_link_address())
                app.deployments[dtarget.deployment_id.name] = state
                state._publish()
                waits.append(state.wait_ready())
            else:
                waits.append(state.apply(dtarget))
        try:
            await asyncio.gather(*waits)
        except BaseException as exc:
            app.status = "DEPLOY_FAILED"
            app.message = str(exc)
            for state in app.deployments.values():
                if state.status != "DEPLOY_FAILED":
                    state.target_num = 0
                    state._kick()
            raise
        app.status = "RUNNING"
        self._publish_routes()
        await self.sync_proxy()

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
        await self.sync_proxy()
        await asyncio.gather(*(s.delete() for s in app.deployments.values()))

    @property
    def closed(self) -> bool:
        """True once shutdown has begun (from this process or over the control socket)."""
        return self._closed

    async def shutdown(self) -> None:
        self._closed = True
        for task in list(self._proxy_tasks):
            task.cancel()
        # The proxy and the replicas drain side by side: an HTTP request in flight
        # needs both until it finishes.
        drain_s = max((state.target.graceful_shutdown_timeout_s for app in self._apps.values()
                       for state in app.deployments.values()), default=0.0)
        await asyncio.gather(self._stop_proxy(drain_s),
                             *(self.delete(name) for name in list(self._apps)))
        await self.backend.aclose()

    # ------------------------------------------------------------------- proxy

    async def start_proxy(self, config: ProxyConfig) -> int:
        """Start the HTTP proxy; return its port. Raises if it can't listen."""
        config = dataclasses.replace(config, controller_address=self._replica_link_address())
        port = await self._spawn_proxy(config)
        # A restarted proxy must come back on the same port, even if 0 was asked for.
        self._proxy_config = dataclasses.replace(config, port=port)
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
                }
                unhealthy = unhealthy or state.status == "UNHEALTHY"
            status = app.status
            if status == "RUNNING" and unhealthy:
                status = "UNHEALTHY"
            apps[name] = {"status": status, "message": app.message,
                          "route_prefix": app.target.route_prefix,
                          "ingress": app.target.ingress, "deployments": deployments}
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


class _ControlServer:
    """Answers other processes (replicas, proxies, the CLI) on the control socket."""

    def __init__(self, controller: Controller) -> None:
        self._controller = controller
        self._loop = asyncio.get_running_loop()

    def start_request(self, meta: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any],
                      sink: ReplySink) -> asyncio.Future[Any] | None:
        method = meta[1]
        if method == "subscribe":
            return self._loop.create_task(self._subscribe(args[0], sink))
        return self._loop.create_task(self._unary(method, args, sink))

    async def _unary(self, method: str, args: tuple[Any, ...], sink: ReplySink) -> None:
        c = self._controller
        try:
            if method == "ingress":
                sink.result(c.ingress(*args))
            elif method == "has_deployment":
                sink.result(c.has_deployment(*args))
            elif method == "status":
                sink.result(c.status())
            elif method == "shutdown":
                sink.result(None)
                await asyncio.sleep(0)
                await c.shutdown()
            else:
                raise LadleError(f"unknown controller method {method!r}")
        except asyncio.CancelledError:
            sink.error(RequestCancelledError(method))
            raise
        except Exception as exc:
            sink.error(exc)

    async def _subscribe(self, key: Hashable, sink: ReplySink) -> None:
        """Stream every new value of ``key``; only the latest matters, so coalesce."""
        latest: list[Any] = []
        changed = asyncio.Event()

        def on_value(value: Any) -> None:
            latest[:] = [value]
            changed.set()

        initial = self._controller.snapshot_for(key)
        if initial is not None:
            on_value(initial)
        unsubscribe = hub.subscribe(key, self._loop, on_value)
        try:
            while True:
                await changed.wait()
                changed.clear()
                if not sink.item(latest[0]):
                    await sink.wait_credit()
        finally:
            unsubscribe()
