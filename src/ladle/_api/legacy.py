"""The 1.x handle: ``Deployment.get_handle(sync=False)``, whose ``remote`` is awaited.

``ref = await handle.remote(x)`` gives a ref (a ``DeploymentResponse``) and
``await ref`` or ``ladle.get(ref)`` its value, as the seeds describe.
"""

from __future__ import annotations

from typing import Any

from .._serving.handle import DeploymentHandle, DeploymentResponse


class AsyncHandle:
    """Legacy asyncio handle: ``await handle.remote(...)`` returns a ref to await."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._handle.remote(*args, **kwargs)

    def options(self, **options: Any) -> AsyncHandle:
        return AsyncHandle(self._handle.options(**options))

    def __getattr__(self, name: str) -> AsyncHandle:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return AsyncHandle(self._handle.options(method_name=name))

    def __reduce__(self) -> Any:
        return (AsyncHandle, (self._handle,))

    def __repr__(self) -> str:
        return f"AsyncHandle({self._handle!r})"


__all__ = ["AsyncHandle", "DeploymentResponse"]
