"""What ``serve.status()`` returns: Ray Serve's status objects, built from the controller's report."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class ApplicationStatus(str, enum.Enum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"

    def __str__(self) -> str:
        return self.value


class DeploymentStatus(str, enum.Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DeploymentStatusOverview:
    status: DeploymentStatus
    replica_states: dict[str, int] = field(default_factory=dict)
    message: str = ""
    target_num_replicas: int = 0


@dataclass(frozen=True)
class ApplicationStatusOverview:
    status: ApplicationStatus
    message: str = ""
    route_prefix: str | None = None
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeStatus:
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
    proxies: dict[str, str] = field(default_factory=dict)


def build_status(raw: dict[str, Any]) -> ServeStatus:
    apps = {}
    for name, app in raw.get("applications", {}).items():
        deployments = {
            dname: DeploymentStatusOverview(
                status=DeploymentStatus(d["status"]), replica_states=dict(d["replica_states"]),
                message=d["message"], target_num_replicas=d["target_num_replicas"])
            for dname, d in app["deployments"].items()}
        apps[name] = ApplicationStatusOverview(
            status=ApplicationStatus(app["status"]), message=app["message"],
            route_prefix=app["route_prefix"], deployments=deployments)
    return ServeStatus(applications=apps, proxies=dict(raw.get("proxies", {})))
