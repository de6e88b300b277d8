"""``@serve.ingress(app)``: a FastAPI (or any ASGI) app as a deployment's HTTP face.

At decoration time this only records the app on the class and marks which
route endpoints the class defines; each replica then binds its own copy of
the app to its instance (``_serving.asgi.bind_ingress_app``).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from .._serving.asgi import APP_ATTR, OWNER_ATTR, OWNER_CLASS_ATTR


def ingress(app: Any) -> Any:
    """Serve ``app`` (FastAPI, Starlette or any ASGI app) from the decorated deployment class.

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
    if not callable(app):
        raise TypeError(f"@serve.ingress takes an ASGI app (e.g. FastAPI()), got {app!r}.")
    _make_app_state_picklable()

    def decorate(cls: Any) -> Any:
        if not inspect.isclass(cls):
            raise TypeError("@serve.ingress must decorate a class, got "
                            f"{type(cls).__name__}.")
        if "__call__" in cls.__dict__:
            raise ValueError(f"Class '{cls.__name__}' passed to @serve.ingress may not define "
                             "`__call__`: HTTP requests go to the app's routes.")
        owner = f"{cls.__module__}.{cls.__qualname__}"
        for endpoint in _route_endpoints(app):
            if _defined_in(endpoint, cls):
                setattr(endpoint, OWNER_ATTR, owner)
        setattr(cls, APP_ATTR, app)
        setattr(cls, OWNER_CLASS_ATTR, owner)
        return cls

    return decorate


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
