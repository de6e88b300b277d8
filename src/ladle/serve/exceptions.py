"""Mirror of ``ray.serve.exceptions``."""

from ..exceptions import BackPressureError as BackPressureError
from ..exceptions import DeploymentFailedError as DeploymentFailedError
from ..exceptions import DeploymentUnavailableError as DeploymentUnavailableError
from ..exceptions import HandleClosedError as HandleClosedError
from ..exceptions import LadleError as LadleError
from ..exceptions import RayServeException as RayServeException
from ..exceptions import RemoteError as RemoteError
from ..exceptions import ReplicaDiedError as ReplicaDiedError
from ..exceptions import ReplicaUnavailableError as ReplicaUnavailableError
from ..exceptions import RequestCancelledError as RequestCancelledError

__all__ = [
    "BackPressureError",
    "DeploymentFailedError",
    "DeploymentUnavailableError",
    "HandleClosedError",
    "LadleError",
    "RayServeException",
    "RemoteError",
    "ReplicaDiedError",
    "ReplicaUnavailableError",
    "RequestCancelledError",
]
