"""Running applications: serve.start/run/delete/shutdown/status and handle lookups.

This process reaches the controller through one client (``_control/client.py``):
a long-lived instance's, when one is running for this user (``ladle start``;
found through the run directory or ``LADLE_ADDRESS``), else one embedded in
this process, as always: the controller on the background loop, replicas
through the chosen backend (child processes, or this process with
``_local_testing_mode``), everything gone when the process ends.  Inside a
replica, lookups go to the controller over the control link instead.
``ladle.get``/``wait`` live in ``refs.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .._control import client as controller_client
from .._control.client import EmbeddedClient, RemoteClient
from .._control.controller import AppTarget, Controller
from .._core.context import current_replica
from .._core.errors import HandleClosedError, LadleError
from .._core.loop import background_loop
from .._core.snapshots import hub
from .._core.types import DeploymentID
from .._serving import control_link
from .._serving.handle import DeploymentHandle
from .._serving.router import close_routers
from .._serving.proxy import ProxyConfig
from .._serving.tls import TlsFiles
from .config import (
    DEFAULT_ROUTE_PREFIX_UNSET,
    HTTPOptions,
    ProxyLocation,
    normalize_proxy_location,
    parse_http_options,
    settings,
    validate_route_prefix,
)
from .deployment import Application, Deployment, set_runtime
from .status import ServeStatus, build_status
from .targets import build_app_target, client_extras

logger = logging.getLogger("ladle")


_instance: EmbeddedClient | RemoteClient | None = None
_lock = threading.RLock()


def _setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s ladle: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(settings().log_level)
        logger.propagate = False


def _get_or_start(local_testing: bool = False, http: HTTPOptions | None = None,
                 *, detached: bool = False) -> EmbeddedClient | RemoteClient:
    """This process's client, connected or started if needed.

    ``http`` given means the user asked for these HTTP options (``serve.start``):
    a port that can't be bound is then an error; with the defaults it is only a
    warning, so applications stay usable from Python.  ``detached`` starts a
    long-lived instance if none is running (``serve.start(detached=True)``).
    """
    global _instance
    with _lock:
        if _instance is not None and _instance.closed:
            _forget(_instance)
        if _instance is not None:
            if http is not None:
                logger.warning("ladle is already running; the new http_options are ignored "
                               "(call serve.shutdown() first).")
            if _instance.local_testing != local_testing:
                raise LadleError(
                    "A ladle instance is already running "
                    f"{'in local testing mode' if _instance.local_testing else 'with processes'}; "
                    "call serve.shutdown() before switching `_local_testing_mode`.")
            return _instance
        if current_replica() is not None or control_link.current_link() is not None:
            raise LadleError("serve.run/start can't be called from inside a deployment.")
        _setup_logging()
        if not local_testing:
            remote = _connect(detached, http)
            if remote is not None:
                if http is not None and not detached:
                    logger.warning("Connected to the running ladle instance; the given "
                                   "http_options are ignored (it keeps its own).")
                _instance = remote
                return remote
        _instance = _start_embedded(local_testing, http)
        return _instance


def _connect(detached: bool, http: HTTPOptions | None) -> RemoteClient | None:
    where = controller_client.find(settings().run_dir, settings().address)
    if where is None and detached:
        options = http or HTTPOptions()
        controller_client.start_detached(settings().run_dir, {
            "http_host": options.host, "http_port": options.port,
            "proxy_location": options.location.value})
        where = controller_client.find(settings().run_dir, settings().address)
    return None if where is None else RemoteClient(where)


def _start_embedded(local_testing: bool, http: HTTPOptions | None) -> EmbeddedClient:
    loop = background_loop()

    async def boot() -> Controller:
        if local_testing:
            from .._backends.inproc import InprocBackend
            backend: Any = InprocBackend()
        else:
            from .._backends.local.backend import LocalBackend, make_private_dir
            root = settings().run_dir
            backend = LocalBackend(make_private_dir(Path(root)) if root else None)
        controller = Controller(backend)
        await controller.start()
        options = http or HTTPOptions()
        if local_testing or options.location == ProxyLocation.Disabled or not options.host:
            return controller
        if http is None:
            # Not asked for: don't make serve.run wait for it, nor fail without it.
            controller.start_proxy_soon(proxy_config(options))
            return controller
        try:
            port = await controller.start_proxy(proxy_config(options))
        except LadleError:
            await controller.shutdown()
            raise
        logger.info("HTTP proxy listening on %s://%s:%d",
                    "https" if options.ssl_certfile else "http", options.host, port)
        return controller

    controller = asyncio.run_coroutine_threadsafe(boot(), loop).result()
    hub.closed = None
    client = EmbeddedClient(controller, local_testing)
    atexit.register(_shutdown_at_exit)
    root = _current_root(controller)
    if root is not None:
        from .._backends.local import current

        current.record(root, controller.address)
    return client


def _forget(instance: EmbeddedClient | RemoteClient) -> None:
    """Drop a client whose instance was shut down from outside (``ladle shutdown``)."""
    global _instance
    if _instance is instance:
        _instance = None
        if isinstance(instance, RemoteClient):
            instance.leave()
            hub.clear()


def _current_root(controller: Controller) -> Path | None:
    """Where the ``current`` file for `ladle status`/`shutdown` goes (local backend only)."""
    run_dir = getattr(controller.backend, "run_dir", None)
    return None if run_dir is None else Path(run_dir).parent


def running() -> bool:
    """Whether this process's instance is up (False once shut down, here or by `ladle shutdown`)."""
    instance = _instance
    return instance is not None and not instance.closed


def proxy_config(options: HTTPOptions) -> ProxyConfig:
    middlewares = []
    for middleware in options.middlewares:
        if not hasattr(middleware, "cls"):
            raise TypeError("http_options['middlewares'] takes starlette Middleware(...) "
                            f"objects, got {middleware!r}.")
        middlewares.append((middleware.cls, tuple(middleware.args), dict(middleware.kwargs)))
    return ProxyConfig(
        host=options.host or "", port=options.port, root_path=options.root_path,
        request_timeout_s=options.request_timeout_s,
        keep_alive_timeout_s=options.keep_alive_timeout_s,
        max_request_body_bytes=options.max_request_body_bytes, middlewares=tuple(middlewares),
        debug=options.debug or settings().debug, access_log=settings().http_access_log,
        tls=TlsFiles(options.ssl_certfile, options.ssl_keyfile or "", options.ssl_keyfile_password,
                     options.ssl_ca_certs) if options.ssl_certfile else None)


def start(*, http_options: Any = None, proxy_location: Any = None, detached: bool = False,
          grpc_options: Any = None, _local_testing_mode: bool = False, **kwargs: Any) -> None:
    """Start this process's instance with HTTP options (``serve.run`` starts one if needed).

    Example:
        ``serve.start(http_options={"host": "127.0.0.1", "port": 8001})``
    """
    if kwargs:
        raise TypeError(f"serve.start() got unexpected arguments: {sorted(kwargs)}")
    options = parse_http_options(http_options)
    if proxy_location is not None:
        options = options.model_copy(
            update={"location": normalize_proxy_location(proxy_location)})
    proxy_config(options)  # bad middlewares fail here, before anything starts
    _get_or_start(_local_testing_mode, options, detached=detached)


def http_port() -> int | None:
    """The port the HTTP proxy of this process's instance listens on (None without one)."""
    if _instance is None:
        return None
    return _instance.http_port


# ------------------------------------------------------------------ run/delete


def run(target: Any, *, name: str = "default", route_prefix: Any = DEFAULT_ROUTE_PREFIX_UNSET,
        blocking: bool = False, logging_config: Any = None, _local_testing_mode: bool = False,
        **kwargs: Any) -> DeploymentHandle:
    """Deploy (or update in place) an application; return its ingress handle when ready.

    Example:
        .. code-block:: python

            handle = serve.run(Model.bind(3), name="default", route_prefix="/")
            assert handle.remote(2).result() == 6
    """
    if kwargs:
        raise TypeError(f"serve.run() got unexpected arguments: {sorted(kwargs)}")
    if isinstance(target, Deployment):
        raise TypeError(f"serve.run() takes an application: call `{target.name}.bind()` "
                        "and pass the result.")
    if not isinstance(target, Application):
        raise TypeError("serve.run() takes an application built with `Deployment.bind()`, "
                        f"got {type(target).__name__}.")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if route_prefix is DEFAULT_ROUTE_PREFIX_UNSET:
        given = target.deployment.config.route_prefix
        route_prefix = "/" if given is DEFAULT_ROUTE_PREFIX_UNSET else given
    route_prefix = validate_route_prefix(route_prefix)
    instance = _get_or_start(_local_testing_mode)
    extras = client_extras() if isinstance(instance, RemoteClient) else None
    app_target = build_app_target(target, name, route_prefix, extras)
    _deploy(instance, app_target)
    handle = DeploymentHandle(app_target.ingress, name)
    if blocking:
        _block_forever(name)
    return handle


def _deploy(instance: EmbeddedClient | RemoteClient, app_target: AppTarget) -> None:
    n = sum(d.num_replicas if d.autoscaling is None else d.autoscaling.initial()
            for d in app_target.deployments)
    logger.info("Deploying application '%s' (%d deployment%s, %d replica%s)...",
                app_target.name, len(app_target.deployments),
                "" if len(app_target.deployments) == 1 else "s", n, "" if n == 1 else "s")
    started = time.monotonic()
    instance.deploy(app_target)
    logger.info("Application '%s' is ready (%.2fs).", app_target.name,
                time.monotonic() - started)


def _block_forever(name: str) -> None:
    """``blocking=True``: serve until Ctrl-C; then the application goes (and with an
    embedded instance, the instance)."""
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        if isinstance(_instance, RemoteClient):
            delete(name)
        else:
            shutdown()


def _existing() -> EmbeddedClient | RemoteClient | None:
    """This process's client, or one connected to a running long-lived instance (None
    if there is none, or inside a replica: that talks over its control link)."""
    global _instance
    with _lock:
        if _instance is not None and _instance.closed:
            _forget(_instance)
        if _instance is None and current_replica() is None and \
                control_link.current_link() is None:
            where = controller_client.find(settings().run_dir, settings().address)
            if where is not None:
                _setup_logging()
                _instance = RemoteClient(where)
        return _instance


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas drain and stop."""
    instance = _existing()
    if instance is None:
        return
    instance.delete(name)


def shutdown() -> None:
    """Delete every application and stop the instance (this process's, or the long-lived
    one it is connected to)."""
    global _instance
    with _lock:
        instance = _instance if _instance is not None else _existing()
        _instance = None
        if instance is None:
            return
        hub.closed = HandleClosedError("The ladle instance was shut down (serve.shutdown()).")
        close_routers(hub.closed)
        try:
            if not instance.closed:
                instance.shutdown()
            elif isinstance(instance, RemoteClient):
                instance.leave()
        finally:
            hub.clear()
            if isinstance(instance, EmbeddedClient):
                root = _current_root(instance.controller)
                if root is not None:
                    from .._backends.local import current

                    current.forget(root, instance.controller.address)


def _shutdown_at_exit() -> None:
    instance = _instance
    try:
        if isinstance(instance, RemoteClient):
            instance.leave()  # its applications outlive this process
        else:
            shutdown()
    except Exception:
        pass


def status() -> ServeStatus:
    """Applications and deployments with their statuses and replica counts."""
    return build_status(status_raw())


# -------------------------------------------------------------------- handles


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of an application's ingress deployment."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    instance = _existing()
    if instance is not None:
        ingress = instance.ingress(name)
        return DeploymentHandle(ingress.name, name)
    link = control_link.current_link()
    if link is None:
        raise LadleError(f"Application '{name}' does not exist: no ladle instance is running.")
    ingress = link.call_sync("ingress", name)
    return DeploymentHandle(ingress.name, name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None,
                          _check_exists: bool = True, _record_telemetry: bool = True
                          ) -> DeploymentHandle:
    """A handle to any deployment; ``app_name`` defaults to the caller's own application."""
    if app_name is None:
        replica = current_replica()
        app_name = replica.app_name if replica is not None else "default"
    deployment_id = DeploymentID(deployment_name, app_name)
    if _check_exists:
        instance = _existing()
        if instance is not None:
            exists = instance.has_deployment(deployment_id)
        else:
            link = control_link.current_link()
            exists = link.call_sync("has_deployment", deployment_id) if link else False
        if not exists:
            raise LadleError(f"Deployment '{deployment_name}' in application '{app_name}' "
                             "does not exist.")
    return DeploymentHandle(deployment_name, app_name)


# --------------------------------------------------------------------- legacy


def deploy_legacy(dep: Deployment, init_args: tuple[Any, ...],
                  init_kwargs: dict[str, Any]) -> None:
    app = dep.bind(*init_args, **init_kwargs) if not dep.is_function else dep.bind()
    instance = _get_or_start(False if _instance is None else _instance.local_testing)
    extras = client_extras() if isinstance(instance, RemoteClient) else None
    _deploy(instance, build_app_target(app, dep.name, dep.route_prefix, extras))


def legacy_handle(name: str, sync: bool) -> Any:
    handle = get_app_handle(name)
    if sync:
        return handle
    from .legacy import AsyncHandle

    return AsyncHandle(handle)


def instance_pids() -> dict[str, int]:
    """Pids of this instance's processes, by replica id (for tests and `ladle status`)."""
    return dict(status_raw().get("pids", {}))


def status_raw() -> dict[str, Any]:
    instance = _existing()
    if instance is not None:
        return instance.status()
    link = control_link.current_link()
    if link is not None:
        result: dict[str, Any] = link.call_sync("status")
        return result
    return {"applications": {}, "pids": {}}


set_runtime(sys.modules[__name__])
