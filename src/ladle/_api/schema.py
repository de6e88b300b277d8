"""Ray Serve's config-file and REST schemas (``ray.serve.schema``), as pydantic models.

``ServeDeploySchema`` is what ``ladle deploy config.yaml`` and
``PUT /api/serve/applications/`` take: Ray 2.60's fields and defaults, so a
file written for Ray validates unchanged.  Where ladle is stricter it says
so: unknown keys are refused (Ray ignores them) and values are not coerced
("5" is not an int).  Options left out of a file stay unset
(``model_fields_set``) rather than taking a sentinel: only what the user
wrote overrides the code.  The ``*Details`` models are what
``GET /api/serve/applications/`` returns.  Checks that need the running
instance (does ``import_path`` import, is a ``runtime_env`` key supported
here) are not here: see ``_control/app_config.py``.
"""

from __future__ import annotations

import enum
import logging
from typing import Annotated, Any, Literal

import pydantic
from pydantic import ConfigDict, Field, field_validator, model_validator

from .config import AutoscalingConfig, ProxyLocation
from .status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ServeStatus,
)

__all__ = [
    "APIType", "ApplicationDetails", "ApplicationStatus", "ApplicationStatusOverview",
    "DeploymentDetails", "DeploymentSchema", "DeploymentStatus", "DeploymentStatusOverview",
    "DeploymentStatusTrigger", "EncodingType", "HTTPOptionsSchema", "LoggingConfig",
    "ProxyDetails", "ProxyLocation", "ProxyStatus", "RayActorOptionsSchema", "ReplicaDetails",
    "ReplicaState", "ServeActorDetails", "ServeApplicationSchema", "ServeDeploySchema",
    "ServeInstanceDetails", "ServeStatus", "gRPCOptionsSchema",
]


class _Schema(pydantic.BaseModel):
    """No unknown keys, no coercion (an int is a float; nothing else converts)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_NonNegative = Annotated[float, Field(ge=0)]


def check_route_prefix_format(value: str | None) -> str | None:
    """Ray's route prefix rules: starts with '/', no trailing '/' (except '/'), no '{' '}'."""
    if value is None:
        return value
    if not value.startswith("/"):
        raise ValueError(f'Got "{value}" for route_prefix. Route prefix must start with "/".')
    if len(value) > 1 and value.endswith("/"):
        raise ValueError(f'Got "{value}" for route_prefix. Route prefix cannot end with "/" '
                         'unless the entire prefix is just "/".')
    if "{" in value or "}" in value:
        raise ValueError(f'Got "{value}" for route_prefix. Route prefix cannot contain '
                         'wildcards, so it cannot contain "{" or "}".')
    return value


# ------------------------------------------------------------------ logging


class EncodingType(str, enum.Enum):
    """Encoding of the serve logs."""

    TEXT = "TEXT"
    JSON = "JSON"


# The attributes every logging.LogRecord has (what additional_log_standard_attrs may name).
_LOG_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


class LoggingConfig(_Schema):
    """How serve components log (``ray.serve.schema.LoggingConfig``).

    Example:
        .. code-block:: python

            @serve.deployment(logging_config=LoggingConfig(log_level="DEBUG"))
            class Model: ...
    """

    encoding: EncodingType | str = "TEXT"
    log_level: int | str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("encoding")
    @classmethod
    def _check_encoding(cls, value: EncodingType | str) -> str:
        if value not in {e.value for e in EncodingType}:
            raise ValueError(f"Got '{value}' for encoding. Encoding must be one of "
                             f"{sorted(e.value for e in EncodingType)}.")
        return str(EncodingType(value).value)

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: int | str) -> str:
        names = logging.getLevelNamesMapping()
        if isinstance(value, int):
            by_number = {number: name for name, number in names.items()
                         if name not in ("WARN", "FATAL")}
            if value not in by_number:
                raise ValueError(f'Got "{value}" for log_level. log_level must be one of '
                                 f"{sorted(by_number)}.")
            return by_number[value]
        if value not in names:
            raise ValueError(f'Got "{value}" for log_level. log_level must be one of '
                             f"{sorted(names)}.")
        return value

    @field_validator("additional_log_standard_attrs")
    @classmethod
    def _check_attrs(cls, value: list[str]) -> list[str]:
        for attr in value:
            if attr not in _LOG_RECORD_ATTRS:
                raise ValueError(f"Unknown attribute '{attr}'. Additional log standard "
                                 f"attributes must be one of {sorted(_LOG_RECORD_ATTRS)}.")
        return sorted(set(value))


# -------------------------------------------------------------- proxies


class HTTPOptionsSchema(_Schema):
    """Options of the HTTP proxy in a config file (fixed once the instance has started)."""

    host: str = "0.0.0.0"
    port: int = 8000
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: int = 90
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None

    @model_validator(mode="after")
    def _check_ssl(self) -> HTTPOptionsSchema:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("Both ssl_keyfile and ssl_certfile must be provided together "
                             "to enable HTTPS.")
        return self


class gRPCOptionsSchema(_Schema):  # noqa: N801 - Ray's name
    """Options of the gRPC proxy (accepted for compatibility; ladle serves no gRPC)."""

    port: int = 9000
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: float | None = None
    enable_reflection: bool = True


# ---------------------------------------------------------- deployments


class RayActorOptionsSchema(_Schema):
    """Options of each replica process (resources are honoured by the cluster backend)."""

    runtime_env: dict[str, Any] = Field(default_factory=dict)
    num_cpus: _NonNegative | None = None
    num_gpus: _NonNegative | None = None
    memory: _NonNegative | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    accelerator_type: str | None = None
    label_selector: dict[str, str] | None = None
    fallback_strategy: list[dict[str, Any]] | None = None


class DeploymentSchema(_Schema):
    """Overrides of one deployment's options in a config file.

    Only the options written down are set (``model_fields_set``); the others
    keep what the code says.  ``autoscaling_config`` stays a dict here (as in
    Ray) and is validated when the application is built.
    """

    model_config = ConfigDict(populate_by_name=True)

    name: str
    num_replicas: Annotated[int, Field(gt=0)] | Literal["auto"] | None = None
    max_ongoing_requests: Annotated[int, Field(gt=0)] | None = None
    max_queued_requests: int | None = None
    backpressure_config: dict[str, Any] | None = None
    user_config: dict[str, Any] | None = None
    autoscaling_config: dict[str, Any] | AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: _NonNegative | None = None
    graceful_shutdown_timeout_s: _NonNegative | None = None
    health_check_period_s: Annotated[float, Field(gt=0)] | None = None
    health_check_timeout_s: Annotated[float, Field(gt=0)] | None = None
    ray_actor_options: RayActorOptionsSchema | None = None
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    placement_group_bundle_label_selector: list[dict[str, str]] | None = None
    max_replicas_per_node: int | None = None
    logging_config: LoggingConfig | None = None
    request_router_config: dict[str, Any] | None = None
    gang_scheduling_config: dict[str, Any] | None = None
    deployment_actors: list[dict[str, Any]] | None = None
    rolling_update_percentage: Annotated[float, Field(gt=0, le=1)] | None = None
    max_surge_percent: Annotated[int, Field(ge=0, le=100)] | None = None

    @model_validator(mode="after")
    def _check_replicas(self) -> DeploymentSchema:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("Manually setting num_replicas is not allowed when "
                             "autoscaling_config is provided.")
        queued = self.max_queued_requests
        if queued is not None and queued != -1 and queued < 1:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer.")
        if self.max_replicas_per_node is not None and self.placement_group_bundles is not None:
            raise ValueError("Setting max_replicas_per_node is not allowed when "
                             "placement_group_bundles is provided.")
        return self

    def user_options(self) -> dict[str, Any]:
        """The options written in the file (``name`` excluded), as plain values."""
        return {key: _plain(getattr(self, key)) for key in self.model_fields_set
                if key != "name"}

    def is_autoscaling_configured(self) -> bool:
        return self.num_replicas == "auto" or self.autoscaling_config is not None


def _plain(value: Any) -> Any:
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(exclude_unset=True)
    return value


# --------------------------------------------------------- applications


class ServeApplicationSchema(_Schema):
    """One application in a config file: what to import and which options to override."""

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = 8000
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    autoscaling_policy: dict[str, Any] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    logging_config: LoggingConfig | None = None
    external_scaler_enabled: bool = False

    @property
    def deployment_names(self) -> list[str]:
        return [d.name for d in self.deployments]

    @field_validator("route_prefix")
    @classmethod
    def _check_route_prefix(cls, value: str | None) -> str | None:
        return check_route_prefix_format(value)

    @field_validator("import_path")
    @classmethod
    def _check_import_path(cls, value: str) -> str:
        if ":" in value:
            if value.count(":") > 1:
                raise ValueError(f'Got invalid import path "{value}". An import path may '
                                 "have at most one colon.")
            if value.startswith(":") or value.endswith(":"):
                raise ValueError(f'Got invalid import path "{value}". An import path may '
                                 "not start or end with a colon.")
        elif "." not in value:
            raise ValueError(f'Got invalid import path "{value}". An import path must '
                             "contain at least one dot or colon separating the module from "
                             'the application, e.g. "module:app".')
        elif value.startswith(".") or value.endswith("."):
            raise ValueError(f'Got invalid import path "{value}". An import path may not '
                             "start or end with a dot.")
        return value

    @field_validator("deployments")
    @classmethod
    def _check_deployment_names(cls, value: list[DeploymentSchema]) -> list[DeploymentSchema]:
        names = [d.name for d in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Found multiple configs for deployment(s) {duplicates}. Please "
                             "remove all duplicates.")
        return value

    @model_validator(mode="after")
    def _check_external_scaler(self) -> ServeApplicationSchema:
        if self.external_scaler_enabled:
            scaled = [d.name for d in self.deployments if d.is_autoscaling_configured()]
            if scaled:
                raise ValueError(
                    "external_scaler_enabled is set to True, but these deployments have "
                    f"autoscaling configured: {scaled}. With an external autoscaler, "
                    "built-in autoscaling must be disabled for every deployment.")
        return self

    @staticmethod
    def get_empty_schema_dict() -> dict[str, Any]:
        return {"import_path": "", "runtime_env": {}, "deployments": []}


class ServeDeploySchema(_Schema):
    """A whole instance's config: what ``ladle deploy`` and ``PUT /api/serve/applications/`` take.

    Deploying one is declarative: applications left out are deleted.

    Example:
        .. code-block:: yaml

            applications:
            - name: app1
              route_prefix: /
              import_path: model:app
              deployments:
              - name: Model
                num_replicas: 2
    """

    proxy_location: ProxyLocation = ProxyLocation.EveryNode
    http_options: HTTPOptionsSchema = Field(default_factory=HTTPOptionsSchema)
    grpc_options: gRPCOptionsSchema = Field(default_factory=gRPCOptionsSchema)
    controller_options: dict[str, Any] | None = None
    logging_config: LoggingConfig | None = None
    tracing_config: dict[str, Any] | None = None
    applications: list[ServeApplicationSchema]
    target_capacity: Annotated[float, Field(ge=0, le=100)] | None = None

    @field_validator("proxy_location", mode="before")
    @classmethod
    def _proxy_location(cls, value: Any) -> Any:
        # A YAML file holds the enum's name; strict mode wants the member.
        if isinstance(value, str):
            try:
                return ProxyLocation(value)
            except ValueError:
                raise ValueError(f"proxy_location must be one of "
                                 f"{[p.value for p in ProxyLocation]}, got {value!r}") from None
        return value

    @field_validator("applications")
    @classmethod
    def _check_applications(cls, value: list[ServeApplicationSchema]
                            ) -> list[ServeApplicationSchema]:
        names = [app.name for app in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"Found multiple configs for application(s) {duplicates}. "
                             "Please remove all duplicates.")
        if any(not name for name in names):
            raise ValueError("Application names must be nonempty.")
        routes = [app.route_prefix for app in value if app.route_prefix is not None]
        clashes = sorted({route for route in routes if routes.count(route) > 1})
        if clashes:
            raise ValueError(f"Found duplicate applications for route prefix(es) {clashes}. "
                             "Please ensure each application's route_prefix is unique.")
        return value

    @model_validator(mode="after")
    def _check_host_and_port(self) -> ServeDeploySchema:
        for app in self.applications:
            for key in ("host", "port"):
                if key in app.model_fields_set:
                    raise ValueError(
                        f"{key.capitalize()} {getattr(app, key)!r} is set in the config for "
                        f"application `{app.name}`. Please remove it and set {key} in the "
                        "top level deploy config only.")
        return self

    @staticmethod
    def get_empty_schema_dict() -> dict[str, Any]:
        return {"applications": []}


# ------------------------------------------------------------- details


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"
    UPDATING = "UPDATING"
    RECOVERING = "RECOVERING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    PENDING_MIGRATION = "PENDING_MIGRATION"


class DeploymentStatusTrigger(str, enum.Enum):
    """How a deployment reached its current status."""

    UNSPECIFIED = "UNSPECIFIED"
    CONFIG_UPDATE_STARTED = "CONFIG_UPDATE_STARTED"
    CONFIG_UPDATE_COMPLETED = "CONFIG_UPDATE_COMPLETED"
    UPSCALE_COMPLETED = "UPSCALE_COMPLETED"
    DOWNSCALE_COMPLETED = "DOWNSCALE_COMPLETED"
    AUTOSCALING = "AUTOSCALING"
    REPLICA_STARTUP_FAILED = "REPLICA_STARTUP_FAILED"
    HEALTH_CHECK_FAILED = "HEALTH_CHECK_FAILED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    DELETING = "DELETING"


class ProxyStatus(str, enum.Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"
    DRAINED = "DRAINED"


class APIType(str, enum.Enum):
    """Where an application came from: a script (imperative) or a config (declarative)."""

    UNKNOWN = "unknown"
    IMPERATIVE = "imperative"
    DECLARATIVE = "declarative"


class _Details(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServeActorDetails(_Details):
    """One process of the instance (on one machine: node fields are the machine's)."""

    node_id: str | None = None
    node_ip: str | None = None
    node_instance_id: str | None = None
    actor_id: str | None = None
    actor_name: str | None = None
    worker_id: str | None = None
    log_file_path: str | None = None


class ReplicaDetails(ServeActorDetails):
    replica_id: str
    state: ReplicaState
    pid: int | None = None
    start_time_s: float


class ProxyDetails(ServeActorDetails):
    status: ProxyStatus


class DeploymentDetails(_Details):
    name: str
    status: DeploymentStatus
    status_trigger: DeploymentStatusTrigger = DeploymentStatusTrigger.UNSPECIFIED
    message: str
    deployment_config: DeploymentSchema
    target_num_replicas: Annotated[int, Field(ge=0)]
    required_resources: dict[str, Any] = Field(default_factory=dict)
    replicas: list[ReplicaDetails]
    recent_dead_replicas: list[ReplicaDetails] = Field(default_factory=list)


class ApplicationDetails(_Details):
    name: str
    route_prefix: str | None
    docs_path: str | None = None
    status: ApplicationStatus
    message: str
    last_deployed_time_s: float
    deployed_app_config: ServeApplicationSchema | None = None
    source: APIType
    deployments: dict[str, DeploymentDetails]
    external_scaler_enabled: bool = False

    @field_validator("route_prefix")
    @classmethod
    def _check_route_prefix(cls, value: str | None) -> str | None:
        return check_route_prefix_format(value)


class ServeInstanceDetails(_Details):
    """The whole instance: what ``GET /api/serve/applications/`` returns."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    controller_info: ServeActorDetails = Field(default_factory=ServeActorDetails)
    proxy_location: ProxyLocation | None = None
    http_options: HTTPOptionsSchema | None = None
    grpc_options: gRPCOptionsSchema | None = None
    proxies: dict[str, ProxyDetails]
    applications: dict[str, ApplicationDetails]
    target_capacity: float | None = None
    target_groups: list[dict[str, Any]] = Field(default_factory=list)

    @staticmethod
    def get_empty_schema_dict() -> dict[str, Any]:
        return {"controller_info": {}, "proxies": {}, "applications": {},
                "target_capacity": None}
