"""Handles and responses (``ray.serve.handle``'s names)."""

from ._serving.handle import DeploymentHandle as DeploymentHandle
from ._serving.handle import DeploymentResponse as DeploymentResponse
from ._serving.handle import DeploymentResponseGenerator as DeploymentResponseGenerator

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]
