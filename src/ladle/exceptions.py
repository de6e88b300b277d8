"""The errors ladle raises; ``ladle.serve.exceptions`` is the same module's names.

    LadleError (= RayServeException)
    ├── BackPressureError            the caller's queue is full (HTTP 503)
    ├── DeploymentUnavailableError   no replica can take the request (503)
    ├── ReplicaDiedError             the replica died mid-request (503)
    ├── ReplicaUnavailableError      Ray's name for a chosen replica that is gone (503)
    ├── RequestCancelledError        cancelled by the caller or a timeout
    ├── HandleClosedError            the instance was shut down
    ├── DeploymentFailedError        a deployment could not start
    └── RemoteError                  a user error that could not be pickled
"""

from ._core.errors import BackPressureError as BackPressureError
from ._core.errors import DeploymentFailedError as DeploymentFailedError
from ._core.errors import DeploymentUnavailableError as DeploymentUnavailableError
from ._core.errors import HandleClosedError as HandleClosedError
from ._core.errors import LadleError as LadleError
from ._core.errors import RayServeException as RayServeException
from ._core.errors import RemoteError as RemoteError
from ._core.errors import ReplicaDiedError as ReplicaDiedError
from ._core.errors import ReplicaUnavailableError as ReplicaUnavailableError
from ._core.errors import RequestCancelledError as RequestCancelledError

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
