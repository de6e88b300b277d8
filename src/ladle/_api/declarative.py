"""Config deploys (declarative) and what describes the instance in Ray's terms.

``deploy_config`` turns a validated ``ServeDeploySchema`` into a change of
the running instance, all or nothing: every application is built first (in
subprocesses, in parallel), the route prefixes are checked against the
applications that stay, and only then does anything change.  ``details``
is the instance as ``GET /api/serve/applications/`` reports it
(``ServeInstanceDetails``), ``status_document`` as ``ladle status`` prints it
(Ray's ``serve status`` layout), ``build_config`` what ``ladle build`` writes (``config_for``).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .._control.controller import AppTarget, Controller
from .._core.errors import LadleError
from .builder import BuildError, SpareBuilder, build_in_subprocess
from .config_file import ConfigError, Problem
from .deployment import Application
from .schema import ServeDeploySchema


async def build_config(config: ServeDeploySchema, base_dir: Path,
                       env: dict[str, str] | None = None, spare: SpareBuilder | None = None
                       ) -> dict[str, tuple[AppTarget, dict[str, Any]]]:
    """Every application of ``config`` built; a ConfigError naming each one that can't be."""
    results = await asyncio.gather(
        *(build_in_subprocess(app, i, base_dir, env, spare)
          for i, app in enumerate(config.applications)), return_exceptions=True)
    problems = []
    built: dict[str, tuple[AppTarget, dict[str, Any]]] = {}
    for app, result in zip(config.applications, results, strict=True):
        if isinstance(result, BuildError):
            problems.append(Problem(result.loc, result.message))
        elif isinstance(result, BaseException):
            raise result
        else:
            built[app.name] = (result, app.model_dump(mode="json", exclude_unset=True))
    if problems:
        raise ConfigError(problems)
    return built


async def deploy_config(controller: Controller, config: ServeDeploySchema, base_dir: Path,
                        *, wait: bool = True, env: dict[str, str] | None = None,
                        tasks: set[asyncio.Task[None]] | None = None,
                        spare: SpareBuilder | None = None) -> list[str]:
    """Apply ``config`` to the instance (refused whole, before any change, if any of it is
    wrong); return the names of its applications.  ``wait``: until all are ready."""
    built = await build_config(config, base_dir, env, spare)
    try:
        controller.check_config(built)
    except LadleError as exc:
        names = [app.name for app in config.applications]
        app_name = getattr(exc, "app_name", None)
        loc: tuple[str | int, ...] = ()
        if app_name in names:
            loc = ("applications", names.index(app_name), "route_prefix")
        raise ConfigError([Problem(loc, str(exc))]) from None
    if wait:
        try:
            await controller.apply_config(built)
        finally:
            if spare is not None:
                spare.warm()
    else:
        assert tasks is not None
        task = asyncio.get_running_loop().create_task(
            _apply_quietly(controller, built, spare))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    return list(built)


async def _apply_quietly(controller: Controller,
                         built: dict[str, tuple[AppTarget, dict[str, Any]]],
                         spare: SpareBuilder | None) -> None:
    try:
        await controller.apply_config(built)
    except (LadleError, Exception):
        pass  # the applications show DEPLOY_FAILED with the reason: status reports it
    finally:
        if spare is not None:
            spare.warm()


# ------------------------------------------------------------------ describing


def details(raw: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``ServeInstanceDetails`` (as JSON-able data) from the controller's status."""
    pids = raw.get("pids", {})
    applications = {}
    for name, app in raw["applications"].items():
        deployments = {}
        for dname, dep in app["deployments"].items():
            deployments[dname] = {
                "name": dname, "status": dep["status"], "status_trigger": "UNSPECIFIED",
                "message": dep["message"], "deployment_config": dep["deployment_config"],
                "target_num_replicas": dep["target_num_replicas"], "required_resources": {},
                "replicas": [{"replica_id": r["replica_id"], "state": r["state"],
                              "pid": r["pid"], "start_time_s": r["start_time_s"],
                              "node_id": "local", "node_ip": "127.0.0.1",
                              "actor_name": r["replica_id"]} for r in dep["replicas"]],
                "recent_dead_replicas": []}
        applications[name] = {
            "name": name, "route_prefix": app["route_prefix"], "docs_path": None,
            "status": app["status"], "message": app["message"],
            "last_deployed_time_s": app["last_deployed_time_s"],
            "deployed_app_config": app.get("config"), "source": app["source"],
            "deployments": deployments, "external_scaler_enabled": False}
    proxies = {}
    if "proxy" in pids:
        proxies["local"] = {"node_id": "local", "node_ip": "127.0.0.1", "actor_name": "proxy",
                            "status": raw.get("proxies", {}).get("local", "HEALTHY")}
    return {
        "controller_info": {"node_id": "local", "node_ip": "127.0.0.1",
                            "actor_name": "ladle::controller", "worker_id": str(os.getpid())},
        "proxy_location": options.get("proxy_location", "HeadOnly"),
        "http_options": {"host": options.get("http_host", "127.0.0.1"),
                         "port": raw.get("http_port") or options.get("http_port", 8000)},
        "proxies": proxies, "applications": applications, "target_capacity": None,
        "target_groups": []}


def status_document(raw: dict[str, Any]) -> dict[str, Any]:
    """``serve status`` as Ray prints it: proxies, applications, their deployments."""
    applications = {}
    for name, app in raw["applications"].items():
        deployments = {
            dname: {"status": dep["status"], "status_trigger": _trigger(dep["status"]),
                    "replica_states": dict(Counter(r["state"] for r in dep["replicas"])),
                    "message": dep["message"]}
            for dname, dep in app["deployments"].items()}
        applications[name] = {"status": app["status"], "message": app["message"],
                              "last_deployed_time_s": app["last_deployed_time_s"],
                              "deployments": deployments}
    return {"proxies": {k: v for k, v in raw.get("proxies", {}).items()},
            "applications": applications, "target_capacity": None}


def _trigger(status: str) -> str:
    return {"HEALTHY": "CONFIG_UPDATE_COMPLETED", "UPDATING": "CONFIG_UPDATE_STARTED",
            "DEPLOY_FAILED": "REPLICA_STARTUP_FAILED",
            "UNHEALTHY": "HEALTH_CHECK_FAILED"}.get(status, "UNSPECIFIED")


def config_for(import_paths: list[str], apps: list[Application]) -> dict[str, Any]:
    """What ``ladle build`` writes for these applications: the options set in the code
    of each deployment, under Ray's layout (``serve build``)."""
    many = len(apps) > 1
    applications = []
    for index, (path, app) in enumerate(zip(import_paths, apps, strict=True)):
        deployments: list[dict[str, Any]] = []
        seen: set[str] = set()
        _collect(app, deployments, seen)
        name = f"app{index + 1}" if many else "app1"
        applications.append({"name": name, "route_prefix": f"/{name}" if many else "/",
                             "import_path": path, "runtime_env": {},
                             "deployments": deployments})
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000},
            "grpc_options": {"port": 9000, "grpc_servicer_functions": [],
                             "enable_reflection": True},
            "logging_config": {"encoding": "TEXT", "log_level": "INFO", "logs_dir": None,
                               "enable_access_log": True, "additional_log_standard_attrs": []},
            "applications": applications}


_BUILD_KEYS = ("num_replicas", "max_ongoing_requests", "max_queued_requests", "user_config",
               "autoscaling_config", "graceful_shutdown_wait_loop_s",
               "graceful_shutdown_timeout_s", "health_check_period_s",
               "health_check_timeout_s", "ray_actor_options")


def _collect(app: Any, out: list[dict[str, Any]], seen: set[str]) -> None:
    if isinstance(app, Application):
        dep = app.deployment
        for child in (*app.init_args, *app.init_kwargs.values()):
            _collect(child, out, seen)
        if dep.name not in seen:
            seen.add(dep.name)
            entry: dict[str, Any] = {"name": dep.name}
            for key in _BUILD_KEYS:
                if key in dep._options:
                    value = dep._options[key]
                    entry[key] = value.model_dump(exclude_unset=True) if hasattr(
                        value, "model_dump") else value
            out.append(entry)
    elif type(app) in (list, tuple):
        for item in app:
            _collect(item, out, seen)
    elif type(app) is dict:
        for item in app.values():
            _collect(item, out, seen)


def dump_yaml(data: dict[str, Any], *, blank_lines: bool = True) -> str:
    """YAML in the order given, multi-line strings as blocks, a blank line between the
    top-level sections (as ``serve build`` writes them)."""
    import yaml

    class Dumper(yaml.SafeDumper):  # type: ignore[misc]
        pass

    def text(dumper: Any, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    if not blank_lines:
        out: str = yaml.dump(data, Dumper=Dumper, sort_keys=False, default_flow_style=False)
        return out
    parts = [yaml.dump({key: value}, Dumper=Dumper, sort_keys=False, default_flow_style=False)
             for key, value in data.items()]
    return "\n".join(parts)
