"""ladle: Ray Serve's API, embedded on one machine, fast.

Map of the package:
  ladle.serve         the ``ray.serve`` mirror: deployment, run, handles, config
  ladle.handle        DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
  ladle.exceptions    the errors ladle raises (root: LadleError == RayServeException)
  ladle.get/wait      ``ray.get``/``ray.wait`` for what handles return
  ladle.ObjectRef     what a deployment receives for a DeploymentResponse nested in
                      its arguments (``ray.ObjectRef``'s place): await it, or ladle.get
Everything under ``ladle._*`` is internal.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["ObjectRef", "get", "wait", "__version__"]


def __getattr__(name: str) -> Any:
    # ladle.get/wait load the runtime on first use, so `import ladle` stays cheap.
    if name in ("get", "wait"):
        from ._api import refs

        return getattr(refs, name)
    if name == "ObjectRef":
        from ._serving.by_reference import ObjectRef

        return ObjectRef
    raise AttributeError(f"module 'ladle' has no attribute {name!r}")
