"""Mirror of ``ray.serve.handle``."""

from ..handle import DeploymentHandle as DeploymentHandle
from ..handle import DeploymentResponse as DeploymentResponse
from ..handle import DeploymentResponseGenerator as DeploymentResponseGenerator

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]
