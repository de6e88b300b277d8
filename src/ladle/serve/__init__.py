"""``ladle.serve``: Ray Serve's ``ray.serve`` API, name for name.

Replace ``from ray import serve`` with ``from ladle import serve``.
"""

# For its side effect only: `starlette.requests` usable after `import starlette`.
from .._api import http_types as _http_types  # noqa: F401
from .._api.batching import batch as batch
from .._api.config import AutoscalingConfig as AutoscalingConfig
from .._api.config import HTTPOptions as HTTPOptions
from .._api.context import get_multiplexed_model_id as get_multiplexed_model_id
from .._api.context import get_replica_context as get_replica_context
from .._api.deployment import Application as Application
from .._api.deployment import Deployment as Deployment
from .._api.deployment import deployment as deployment
from .._api.ingress import ingress as ingress
from .._api.lifecycle import delete as delete
from .._api.lifecycle import get_app_handle as get_app_handle
from .._api.lifecycle import get_deployment_handle as get_deployment_handle
from .._api.lifecycle import run as run
from .._api.lifecycle import shutdown as shutdown
from .._api.lifecycle import start as start
from .._api.lifecycle import status as status
from .._api.multiplex import multiplexed as multiplexed
from . import config as config
from . import exceptions as exceptions
from . import handle as handle

__all__ = [
    "Application",
    "AutoscalingConfig",
    "Deployment",
    "HTTPOptions",
    "batch",
    "config",
    "delete",
    "deployment",
    "exceptions",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "handle",
    "ingress",
    "multiplexed",
    "run",
    "shutdown",
    "start",
    "status",
]
