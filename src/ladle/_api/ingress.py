"""``@serve.ingress(app)``: a FastAPI (or any ASGI) app as a deployment's HTTP face.

At decoration time this only records the app on the class and marks which
route endpoints the class defines; each replica then binds its own copy of
the app to its instance (``_serving.asgi.bind_ingress_app``).
"""

from __future__ import annotations

import inspect
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
            if any(endpoint is value for value in cls.__dict__.values()):
                setattr(endpoint, OWNER_ATTR, owner)
        setattr(cls, APP_ATTR, app)
        setattr(cls, OWNER_CLASS_ATTR, owner)
        return cls

    return decorate


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


def _reduce_state(state: Any) -> tuple[Any, tuple[dict[str, Any]]]:
    return type(state), (dict(state._state),)
