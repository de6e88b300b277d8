"""Mirror of ``ray.serve.schema``: config-file, REST and status models."""

from .._api.schema import APIType as APIType
from .._api.schema import ApplicationDetails as ApplicationDetails
from .._api.schema import ApplicationStatus as ApplicationStatus
from .._api.schema import ApplicationStatusOverview as ApplicationStatusOverview
from .._api.schema import DeploymentDetails as DeploymentDetails
from .._api.schema import DeploymentSchema as DeploymentSchema
from .._api.schema import DeploymentStatus as DeploymentStatus
from .._api.schema import DeploymentStatusOverview as DeploymentStatusOverview
from .._api.schema import DeploymentStatusTrigger as DeploymentStatusTrigger
from .._api.schema import EncodingType as EncodingType
from .._api.schema import HTTPOptionsSchema as HTTPOptionsSchema
from .._api.schema import LoggingConfig as LoggingConfig
from .._api.schema import ProxyDetails as ProxyDetails
from .._api.schema import ProxyLocation as ProxyLocation
from .._api.schema import ProxyStatus as ProxyStatus
from .._api.schema import RayActorOptionsSchema as RayActorOptionsSchema
from .._api.schema import ReplicaDetails as ReplicaDetails
from .._api.schema import ReplicaState as ReplicaState
from .._api.schema import ServeActorDetails as ServeActorDetails
from .._api.schema import ServeApplicationSchema as ServeApplicationSchema
from .._api.schema import ServeDeploySchema as ServeDeploySchema
from .._api.schema import ServeInstanceDetails as ServeInstanceDetails
from .._api.schema import ServeStatus as ServeStatus
from .._api.schema import gRPCOptionsSchema as gRPCOptionsSchema

__all__ = [
    "APIType",
    "ApplicationDetails",
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentDetails",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "DeploymentStatusTrigger",
    "EncodingType",
    "HTTPOptionsSchema",
    "LoggingConfig",
    "ProxyDetails",
    "ProxyLocation",
    "ProxyStatus",
    "RayActorOptionsSchema",
    "ReplicaDetails",
    "ReplicaState",
    "ServeActorDetails",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeInstanceDetails",
    "ServeStatus",
    "gRPCOptionsSchema",
]
