"""Running applications: serve.start/run/delete/shutdown/status and handle lookups.

The driver process hosts the instance: the controller runs on the
background loop, replicas run through the chosen backend (child processes,
or this process with ``_local_testing_mode``).  Inside a replica, lookups go
to the controller over the control link instead.  ``ladle.get``/``wait``
live in ``refs.py``.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import logging
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from .._control.autoscaling import AutoscalingPolicy
from .._control.controller import AppTarget, Controller
from .._control.deployment_state import DeploymentTarget
from .._core.context import current_replica
from .._core.errors import HandleClosedError, LadleError
from .._core.loop import background_loop, running_loop
from .._core.serialization import dumps
from .._core.snapshots import hub
from .._core.types import DeploymentID
from .._serving import control_link
from .._serving.handle import DeploymentHandle
from .._serving.router import close_routers
from .._serving.proxy import ProxyConfig
from .config import (
    DEFAULT_ROUTE_PREFIX_UNSET,
    HTTPOptions,
    ProxyLocation,
    normalize_proxy_location,
    parse_http_options,
    settings,
    validate_route_prefix,
)
from .deployment import Application, Deployment
from .status import ServeStatus, build_status

logger = logging.getLogger("ladle")


class _Instance:
    def __init__(self, controller: Controller, local_testing: bool) -> None:
        self.controller = controller
        self.local_testing = local_testing
        self.loop = background_loop()

    def call(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run a controller coroutine on its loop and wait for it from this thread."""
        if running_loop() is self.loop:
            coro.close()
            raise RuntimeError("This serve API can't be called from ladle's own loop.")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def lookup(self, fn: Any, *args: Any) -> Any:
        """Run a synchronous controller lookup on its loop (directly, if already on it)."""
        if running_loop() is self.loop:
            return fn(*args)  # user code of an in-process replica (local testing mode)
        return self.call(_apply(fn, *args))


async def _apply(fn: Any, *args: Any) -> Any:
    return fn(*args)


_instance: _Instance | None = None
_lock = threading.RLock()


def _setup_logging() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s ladle: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(settings().log_level)
        logger.propagate = False


def _get_or_start(local_testing: bool = False, http: HTTPOptions | None = None) -> _Instance:
    """This process's instance, started if needed.

    ``http`` given means the user asked for these HTTP options (``serve.start``):
    a port that can't be bound is then an error; with the defaults it is only a
    warning, so applications stay usable from Python.
    """
    global _instance
    with _lock:
        if _instance is not None:
            if http is not None:
                logger.warning("ladle is already running in this process; the new "
                               "http_options are ignored (call serve.shutdown() first).")
            if _instance.local_testing != local_testing:
                raise LadleError(
                    "A ladle instance is already running "
                    f"{'in local testing mode' if _instance.local_testing else 'with processes'}; "
                    "call serve.shutdown() before switching `_local_testing_mode`.")
            return _instance
        if current_replica() is not None or control_link.current_link() is not None:
            raise LadleError("serve.run/start can't be called from inside a deployment.")
        _setup_logging()
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
            if local_testing or options.location == ProxyLocation.Disabled:
                return controller
            if http is None:
                # Not asked for: don't make serve.run wait for it, nor fail without it.
                controller.start_proxy_soon(_proxy_config(options))
                return controller
            try:
                port = await controller.start_proxy(_proxy_config(options))
            except LadleError:
                await controller.shutdown()
                raise
            logger.info("HTTP proxy listening on http://%s:%d", options.host, port)
            return controller

        controller = asyncio.run_coroutine_threadsafe(boot(), loop).result()
        hub.closed = None
        _instance = _Instance(controller, local_testing)
        atexit.register(_shutdown_at_exit)
        root = _current_root(controller)
        if root is not None:
            from .._backends.local import current

            current.record(root, controller.address)
        return _instance


def _current_root(controller: Controller) -> Path | None:
    """Where the ``current`` file for `ladle status`/`shutdown` goes (local backend only)."""
    run_dir = getattr(controller.backend, "run_dir", None)
    return None if run_dir is None else Path(run_dir).parent


def running() -> bool:
    """Whether this process's instance is up (False once shut down, here or by `ladle shutdown`)."""
    instance = _instance
    return instance is not None and not instance.controller.closed


def _proxy_config(options: HTTPOptions) -> ProxyConfig:
    middlewares = []
    for middleware in options.middlewares:
        if not hasattr(middleware, "cls"):
            raise TypeError("http_options['middlewares'] takes starlette Middleware(...) "
                            f"objects, got {middleware!r}.")
        middlewares.append((middleware.cls, tuple(middleware.args), dict(middleware.kwargs)))
    return ProxyConfig(
        host=options.host, port=options.port, root_path=options.root_path,
        request_timeout_s=options.request_timeout_s,
        keep_alive_timeout_s=options.keep_alive_timeout_s,
        max_request_body_bytes=options.max_request_body_bytes, middlewares=tuple(middlewares),
        debug=options.debug or settings().debug, access_log=settings().http_access_log)


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
    _proxy_config(options)  # bad middlewares fail here, before anything starts
    _get_or_start(_local_testing_mode, options)


def http_port() -> int | None:
    """The port the HTTP proxy of this process's instance listens on (None without one)."""
    if _instance is None:
        return None
    return _instance.controller.http_port


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
    app_target = build_app_target(target, name, route_prefix)
    _deploy(instance, app_target)
    handle = DeploymentHandle(app_target.ingress, name)
    if blocking:
        _block_forever()
    return handle


def _deploy(instance: _Instance, app_target: AppTarget) -> None:
    n = sum(d.num_replicas if d.autoscaling is None else d.autoscaling.initial()
            for d in app_target.deployments)
    logger.info("Deploying application '%s' (%d deployment%s, %d replica%s)...",
                app_target.name, len(app_target.deployments),
                "" if len(app_target.deployments) == 1 else "s", n, "" if n == 1 else "s")
    started = time.monotonic()
    try:
        instance.call(instance.controller.deploy(app_target))
    except LadleError:
        raise
    logger.info("Application '%s' is ready (%.2fs).", app_target.name,
                time.monotonic() - started)


def _block_forever() -> None:
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        shutdown()


def build_app_target(app: Application, name: str, route_prefix: str | None) -> AppTarget:
    """Flatten the bound tree into deployment targets; bound children become handles."""
    targets: dict[str, DeploymentTarget] = {}
    seen: dict[int, str] = {}
    start_timeout_s = settings().start_timeout_s

    def visit(node: Application) -> str:
        if id(node) in seen:
            return seen[id(node)]
        dep = node.deployment
        dname = dep.name
        if dname in targets:
            suffix = 1
            while f"{dname}_{suffix}" in targets:
                suffix += 1
            dname = f"{dname}_{suffix}"
        seen[id(node)] = dname
        targets[dname] = None  # type: ignore[assignment]  # reserve the name
        args = tuple(replace_apps(a) for a in node.init_args)
        kwargs = {k: replace_apps(v) for k, v in node.init_kwargs.items()}
        targets[dname] = make_target(dep, dname, args, kwargs)
        return dname

    def replace_apps(value: Any) -> Any:
        if isinstance(value, Application):
            return DeploymentHandle(visit(value), name)
        if isinstance(value, Deployment):
            raise TypeError(f"Deployment '{value.name}' was passed to `.bind()` unbound; "
                            f"pass `{value.name}.bind()` instead.")
        if type(value) in (list, tuple):
            return type(value)(replace_apps(v) for v in value)
        if type(value) is dict:
            return {k: replace_apps(v) for k, v in value.items()}
        return value

    def make_target(dep: Deployment, dname: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> DeploymentTarget:
        try:
            code = _serialize_code(dep.func_or_class)
        except Exception as exc:
            raise TypeError(f"Could not serialize deployment '{dname}' "
                            f"({dep.func_or_class!r}): {exc}") from exc
        try:
            init = dumps((args, kwargs))
        except Exception as exc:
            raise TypeError(f"Could not serialize the arguments bound to deployment "
                            f"'{dname}': {exc}") from exc
        config = dep.config
        autoscaling = config.resolved_autoscaling()
        policy = None
        if autoscaling is not None:
            policy = AutoscalingPolicy(
                min_replicas=autoscaling.min_replicas, max_replicas=autoscaling.max_replicas,
                initial_replicas=autoscaling.initial_replicas,
                target_ongoing_requests=autoscaling.target_ongoing_requests,
                upscale_delay_s=autoscaling.upscale_delay_s,
                downscale_delay_s=autoscaling.downscale_delay_s,
                upscaling_factor=autoscaling.get_upscaling_factor(),
                downscaling_factor=autoscaling.get_downscaling_factor(),
                metrics_interval_s=autoscaling.metrics_interval_s)
        version = config.version or hashlib.sha256(
            code + init + repr((config.max_ongoing_requests,)).encode()).hexdigest()[:16]
        return DeploymentTarget(
            deployment_id=DeploymentID(dname, name), serialized_callable=code,
            serialized_init=init, is_function=dep.is_function, code_version=version,
            num_replicas=config.num_replicas if isinstance(config.num_replicas, int) else 1,
            autoscaling=policy, max_ongoing_requests=config.max_ongoing_requests,
            max_queued_requests=config.max_queued_requests, user_config=config.user_config,
            health_check_period_s=config.health_check_period_s,
            health_check_timeout_s=config.health_check_timeout_s,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            graceful_shutdown_wait_loop_s=config.graceful_shutdown_wait_loop_s,
            start_timeout_s=start_timeout_s)

    ingress = visit(app)
    return AppTarget(name, route_prefix, ingress, tuple(targets.values()))


# Serialized code by class/function.  Unpickling a by-value class in this process (local
# testing mode) updates the class in place and changes its next pickle's bytes, which would
# make the same code look like a new version (restarting replicas on a user_config change).
_serialized_code: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def _serialize_code(func_or_class: Any) -> bytes:
    code = _serialized_code.get(func_or_class)
    if code is None:
        code = _serialized_code[func_or_class] = dumps(func_or_class)
    return code


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas drain and stop."""
    instance = _instance
    if instance is None:
        return
    instance.call(instance.controller.delete(name))


def shutdown() -> None:
    """Delete every application and stop this process's instance."""
    global _instance
    with _lock:
        instance, _instance = _instance, None
        if instance is None:
            return
        hub.closed = HandleClosedError("The ladle instance was shut down (serve.shutdown()).")
        close_routers(hub.closed)
        try:
            instance.call(instance.controller.shutdown(), timeout_s=60)
        finally:
            hub.clear()
            root = _current_root(instance.controller)
            if root is not None:
                from .._backends.local import current

                current.forget(root, instance.controller.address)


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception:
        pass


def status() -> ServeStatus:
    """Applications and deployments with their statuses and replica counts."""
    if _instance is not None:
        raw = _instance.lookup(_instance.controller.status)
    else:
        link = control_link.current_link()
        raw = link.call_sync("status") if link is not None else {"applications": {}}
    return build_status(raw)


# -------------------------------------------------------------------- handles


def get_app_handle(name: str) -> DeploymentHandle:
    """The handle of an application's ingress deployment."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if _instance is not None:
        ingress = _instance.lookup(_instance.controller.ingress, name)
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
        if _instance is not None:
            exists = _instance.lookup(_instance.controller.has_deployment, deployment_id)
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
    _deploy(instance, build_app_target(app, dep.name, dep.route_prefix))


def legacy_handle(name: str, sync: bool) -> Any:
    handle = get_app_handle(name)
    if sync:
        return handle
    from .legacy import AsyncHandle

    return AsyncHandle(handle)


def instance_pids() -> dict[str, int]:
    """Pids of this instance's processes, by replica id (for tests and `ladle status`)."""
    if _instance is None:
        return {}
    return dict(status_raw().get("pids", {}))


def status_raw() -> dict[str, Any]:
    if _instance is None:
        return {"applications": {}, "pids": {}}
    result: dict[str, Any] = _instance.lookup(_instance.controller.status)
    return result
