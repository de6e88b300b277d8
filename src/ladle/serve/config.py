"""Mirror of ``ray.serve.config``."""

from .._api.config import AutoscalingConfig as AutoscalingConfig
from .._api.config import DeploymentConfig as DeploymentConfig
from .._api.config import HTTPOptions as HTTPOptions
from .._api.config import ProxyLocation as ProxyLocation
from .._api.config import gRPCOptions as gRPCOptions

__all__ = ["AutoscalingConfig", "DeploymentConfig", "HTTPOptions", "ProxyLocation", "gRPCOptions"]
