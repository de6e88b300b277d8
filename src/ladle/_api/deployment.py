"""Definitions as data: ``@serve.deployment``, ``Deployment``, ``Application``.

A ``Deployment`` is a user class or function plus validated options; ``bind``
makes an ``Application`` (a tree of bound deployments).  Nothing here starts
anything: ``lifecycle.py`` turns an Application into targets for the
controller.  The legacy 1.x methods (``deploy``, ``get_handle``, ``delete``)
are thin calls into the runtime, which ``lifecycle`` installs with
``set_runtime`` when it is imported (so imports go one way: lifecycle uses
these definitions, never the reverse).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from .config import (
    DEFAULT_ROUTE_PREFIX_UNSET,
    DeploymentConfig,
    build_deployment_config,
    validate_deployment_options,
)


class _Runtime(Protocol):
    def deploy_legacy(self, dep: Deployment, init_args: tuple[Any, ...],
                      init_kwargs: dict[str, Any]) -> None: ...
    def legacy_handle(self, name: str, sync: bool) -> Any: ...
    def delete(self, name: str, _blocking: bool = True) -> None: ...


_runtime: _Runtime | None = None


def set_runtime(runtime: _Runtime) -> None:
    """Install what runs applications (``lifecycle``) for the legacy methods."""
    global _runtime
    _runtime = runtime


def _get_runtime() -> _Runtime:
    if _runtime is None:
        import importlib

        importlib.import_module("ladle._api.lifecycle")  # installs itself
    assert _runtime is not None
    return _runtime


class Deployment:
    """A class or function with its deployment options; build apps with ``.bind()``.

    Example:
        .. code-block:: python

            @serve.deployment(num_replicas=2)
            class Model:
                def __call__(self, x: int) -> int:
                    return x * 2

            handle = serve.run(Model.bind())
    """

    def __init__(self, func_or_class: Any, options: dict[str, Any]) -> None:
        self.func_or_class = func_or_class
        self._options = options
        self._config: DeploymentConfig = build_deployment_config(options)
        self._is_function = not inspect.isclass(func_or_class)

    # -------------------------------------------------------------- properties

    @property
    def name(self) -> str:
        return self._config.name or self.func_or_class.__name__

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def is_function(self) -> bool:
        return self._is_function

    @property
    def version(self) -> str | None:
        return self._config.version

    @property
    def num_replicas(self) -> int | str | None:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def ray_actor_options(self) -> dict[str, Any] | None:
        options = self._config.ray_actor_options
        return dict(options) if options is not None else None

    @property
    def route_prefix(self) -> str | None:
        if self._config.route_prefix_given:
            return self._config.route_prefix  # type: ignore[return-value]
        return f"/{self.name}"

    # ------------------------------------------------------------------ build

    def options(self, **options: Any) -> Deployment:
        """A copy of this deployment with some options changed (validated now)."""
        if "_func_or_class" in options:
            func_or_class = options.pop("_func_or_class")
        else:
            func_or_class = self.func_or_class
        changes = validate_deployment_options(**options)
        merged = {**self._options, **changes}
        if "num_replicas" in changes and isinstance(changes["num_replicas"], int):
            merged.pop("autoscaling_config", None)
        if changes.get("autoscaling_config") is not None and isinstance(
                merged.get("num_replicas"), int):
            merged.pop("num_replicas")
        return Deployment(func_or_class, merged)

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Build an application whose ingress is this deployment.

        Bound deployments among the arguments arrive in the constructor as
        ``DeploymentHandle``s.
        """
        if self._is_function and (args or kwargs):
            raise TypeError(f"Function deployment '{self.name}' takes no constructor "
                            "arguments; call `.bind()` without arguments.")
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("Deployments cannot be constructed directly. "
                           "Use `Deployment.bind()` and `serve.run()` instead.")

    # ------------------------------------------------------------------ legacy

    def deploy(self, *init_args: Any, _blocking: bool = True, **init_kwargs: Any) -> None:
        """Legacy 1.x: deploy as its own application at ``route_prefix`` (``/{name}``)."""
        _get_runtime().deploy_legacy(self, init_args, init_kwargs)

    def get_handle(self, sync: bool = True) -> Any:
        """Legacy 1.x: a handle to this deployed deployment (``sync=False``: awaitable calls)."""
        return _get_runtime().legacy_handle(self.name, sync)

    def delete(self) -> None:
        """Legacy 1.x: delete this deployment's application."""
        _get_runtime().delete(self.name)

    def __repr__(self) -> str:
        return f"Deployment(name={self.name!r})"


class Application:
    """One or more bound deployments, runnable with ``serve.run``."""

    def __init__(self, deployment: Deployment, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._deployment = deployment
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment:
        return self._deployment

    @property
    def init_args(self) -> tuple[Any, ...]:
        return self._args

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return self._kwargs

    def __repr__(self) -> str:
        return f"Application(ingress={self._deployment.name!r})"


def deployment(_func_or_class: Any = None, **options: Any) -> Any:
    """Turn a class or function into a ``Deployment``; bare or with options.

    Options are validated here, so a bad value raises at decoration time.

    Example:
        .. code-block:: python

            @serve.deployment(num_replicas=2, max_ongoing_requests=16)
            class Model: ...

            @serve.deployment
            def hello(name: str) -> str:
                return f"Hello {name}!"
    """
    validated = validate_deployment_options(**options)

    def decorate(func_or_class: Any) -> Deployment:
        _check_target(func_or_class)
        return Deployment(func_or_class, dict(validated))

    if _func_or_class is not None:
        if options:
            raise TypeError("Use either `@serve.deployment` or `@serve.deployment(...)`, "
                            "not positional and keyword arguments together.")
        return decorate(_func_or_class)
    return decorate


def _check_target(func_or_class: Any) -> None:
    if isinstance(func_or_class, Deployment):
        raise TypeError("This is already a Deployment; use `.options(...)` to change it.")
    if inspect.isclass(func_or_class) or inspect.isfunction(func_or_class):
        return
    if callable(func_or_class) and not isinstance(func_or_class, type):
        raise TypeError("@serve.deployment must decorate a class or a function, got an "
                        f"instance of {type(func_or_class).__name__}.")
    raise TypeError("@serve.deployment must decorate a class or a function, "
                    f"got {func_or_class!r}.")


__all__ = ["Application", "Deployment", "deployment"]
