"""``@serve.ingress``: a FastAPI (or any ASGI) app as a deployment's HTTP face.

Three ways to give the app, as in Ray Serve: the app itself; a function
without arguments that builds it (called in each replica, after the
constructor); or nothing, with the class defining ``__serve_build_asgi_app__``.
The decorator may also be called without a class (``serve.ingress(app)()``),
which makes a plain class that only keeps its constructor arguments.

At decoration time this only records on the class how to get the app, and
marks which route endpoints the class defines; each replica then makes its
own app (``_serving.asgi.build_ingress_app``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from .._serving.asgi import APP_ATTR, BUILDER_ATTR, LATE_BUILD_METHOD, OWNER_ATTR, OWNER_CLASS_ATTR


def ingress(app: Any = None) -> Any:
    """Serve ``app`` (FastAPI, Starlette or any ASGI app) from the decorated deployment class.

    ``app`` may also be a function without arguments that returns the app (it
    runs in each replica), or left out when the class defines
    ``__serve_build_asgi_app__(self)``.  ``serve.ingress(app)()`` without a
    class gives a class that serves the app and takes any constructor arguments.

    Example:
        .. code-block:: python

            app = FastAPI()

            @serve.deployment
            @serve.ingress(app)
            class Api:
                @app.get("/hello")
                def hello(self, name: str) -> str:
                    return f"Hello {name}!"
    """
    if app is not None and not callable(app):
        raise TypeError("@serve.ingress takes an ASGI app (e.g. FastAPI()) or a function that "
                        f"builds one, got {app!r}.")
    builder = app if _is_builder(app) else None
    if app is not None and builder is None:
        _make_app_state_picklable()

    def decorate(cls: Any = None) -> Any:
        if cls is None:
            cls = _plain_ingress_class()
        if not inspect.isclass(cls):
            raise ValueError("@serve.ingress must decorate a class, got "
                             f"{type(cls).__name__} {cls!r}.")
        if any("__call__" in vars(base) for base in cls.__mro__):
            raise ValueError(f"Class '{cls.__name__}' passed to @serve.ingress may not have a "
                             "`__call__` method: HTTP requests go to the app's routes.")
        if app is None:
            if not callable(getattr(cls, LATE_BUILD_METHOD, None)):
                raise ValueError(f"@serve.ingress() without an app needs class '{cls.__name__}' "
                                 f"to define `{LATE_BUILD_METHOD}(self)` returning the ASGI app.")
            setattr(cls, BUILDER_ATTR, LATE_BUILD_METHOD)
        elif builder is not None:
            setattr(cls, BUILDER_ATTR, staticmethod(builder))
        else:
            owner = f"{cls.__module__}.{cls.__qualname__}"
            for endpoint in _route_endpoints(app):
                if _defined_in(endpoint, cls):
                    setattr(endpoint, OWNER_ATTR, owner)
            setattr(cls, APP_ATTR, app)
            setattr(cls, OWNER_CLASS_ATTR, owner)
        return cls

    return decorate


def _is_builder(app: Any) -> bool:
    """A plain function that can be called without arguments builds the app.

    Ray Serve takes every plain function for a builder; one that needs
    arguments can only be an ASGI app itself (``async def app(scope, receive,
    send)``), which ladle serves as such.
    """
    if not inspect.isfunction(app):
        return False
    try:
        inspect.signature(app).bind()
    except TypeError:
        return False
    return True


def _plain_ingress_class() -> type:
    class ASGIIngressDeployment:
        """The class of ``serve.ingress(app)()``: keeps its constructor arguments."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.args = args
            self.kwargs = kwargs

    return ASGIIngressDeployment


def _defined_in(endpoint: Any, cls: Any) -> bool:
    """Whether a route's function was written in the class body.

    By name, not by the class attribute: FastAPI lets two routes use one method
    name (the class then holds only the last function), as Ray Serve does too.
    """
    if any(endpoint is value for value in cls.__dict__.values()):
        return True
    name = getattr(endpoint, "__name__", None)
    return (getattr(endpoint, "__module__", None) == cls.__module__
            and getattr(endpoint, "__qualname__", None) == f"{cls.__qualname__}.{name}")


def _route_endpoints(app: Any) -> list[Any]:
    return [route.endpoint for route in getattr(app, "routes", ())
            if getattr(route, "endpoint", None) is not None]


def _make_app_state_picklable() -> None:
    """Ship ``app.state`` by its contents.

    Starlette's ``State.__getattr__`` recurses forever on a half-built instance,
    which is what unpickling makes, so the app could not reach the replicas.
    """
    import copyreg

    try:
        from starlette.datastructures import State
    except ImportError:
        return
    copyreg.pickle(State, _reduce_state)
    # Recent FastAPI keeps each `include_router` as an `_IncludedRouter` holding a
    # threading.Lock and route caches: ship its router and prefix context only.
    included = getattr(sys.modules.get("fastapi.routing"), "_IncludedRouter", None)
    if included is not None:
        copyreg.pickle(included, _reduce_included_router)


def _reduce_state(state: Any) -> tuple[Any, tuple[dict[str, Any]]]:
    return type(state), (dict(state._state),)


def _reduce_included_router(route: Any) -> tuple[Any, tuple[Any, Any]]:
    return type(route), (route.original_router, route.include_context)
