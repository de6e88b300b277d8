"""Building a config file's application: import it, apply the file's overrides, flatten it.

``build`` does it in this process: the application's ``runtime_env``
(``working_dir`` becomes the directory it imports from and runs in,
``env_vars`` are set) applies first, then ``import_path`` is imported (an
application, a deployment, or a builder function called with ``args``),
then each ``deployments[]`` entry overrides the options of the deployment of
that name.  Problems raise ``BuildError`` with the config field they belong
to (``applications[0].import_path``, ``...deployments[1].num_replicas``) and,
for user code that raised, the user's traceback.

``build_in_subprocess`` runs that in a fresh ``python -m ladle._api.builder``
(the controller never imports user code: a module that hangs, crashes or
changes global state can't take the instance with it, and every deploy sees
the code as it is on disk now).  The child answers on its own stdout; what
the user's code prints goes to stderr.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any

from .._control.controller import AppTarget
from .config_file import Loc, format_loc, resolve_working_dir
from .deployment import Application, Deployment
from .schema import DeploymentSchema, ServeApplicationSchema
from .targets import build_app_target

logger = logging.getLogger("ladle")

# DeploymentSchema fields that mean nothing on one machine: accepted, ignored.
_CLUSTER_ONLY = frozenset({
    "placement_group_bundles", "placement_group_strategy",
    "placement_group_bundle_label_selector", "max_replicas_per_node", "gang_scheduling_config",
    "deployment_actors", "request_router_config", "backpressure_config",
    "rolling_update_percentage", "max_surge_percent", "logging_config"})
_RAY_ACTOR_KEYS = frozenset({"num_cpus", "num_gpus", "memory", "resources", "accelerator_type",
                             "runtime_env"})


class BuildError(Exception):
    """An application of a config that can't be built; ``loc`` is the field to blame."""

    def __init__(self, loc: Loc, message: str) -> None:
        super().__init__(f"{format_loc(loc)}: {message}")
        self.loc = loc
        self.message = message


def runtime_extras(app: ServeApplicationSchema, base_dir: Path) -> dict[str, Any]:
    """Where the application's replicas import from and run, and their extra env vars."""
    working_dir = app.runtime_env.get("working_dir")
    directory = resolve_working_dir(working_dir, base_dir) if working_dir else base_dir
    return {"sys_path": [str(directory)], "cwd": str(directory),
            "env_vars": dict(app.runtime_env.get("env_vars", {}))}


def build(app: ServeApplicationSchema, index: int, base_dir: Path) -> AppTarget:
    """Build ``app`` (the ``index``-th of its config) in this process."""
    where: Loc = ("applications", index)
    extras = runtime_extras(app, base_dir)
    os.environ.update(extras["env_vars"])
    os.chdir(extras["cwd"])
    if extras["cwd"] not in sys.path:
        sys.path.insert(0, extras["cwd"])
    root = _import(app, where)
    overrides = {d.name: (i, d) for i, d in enumerate(app.deployments)}
    seen: set[str] = set()
    root = _override(root, overrides, seen, where)
    missing = [name for name in overrides if name not in seen]
    if missing:
        i, _ = overrides[missing[0]]
        raise BuildError((*where, "deployments", i, "name"),
                         f"no deployment named {missing[0]!r} in application {app.name!r} "
                         f"(it has: {', '.join(sorted(seen))})")
    if "route_prefix" in app.model_fields_set:
        route_prefix = app.route_prefix
    else:  # as with Ray: the ingress deployment's, else "/"
        given = root.deployment.config.route_prefix
        route_prefix = "/" if not root.deployment.config.route_prefix_given else given  # type: ignore[assignment]
    try:
        return build_app_target(root, app.name, route_prefix, extras)
    except (TypeError, ValueError) as exc:
        raise BuildError((*where, "import_path"), str(exc)) from None


def _import(app: ServeApplicationSchema, where: Loc) -> Application:
    module_name, sep, attr = app.import_path.partition(":")
    if not sep:
        module_name, _, attr = app.import_path.rpartition(".")
    loc = (*where, "import_path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise BuildError(loc, f"no module named {exc.name!r} (looked in "
                             f"{sys.path[0]} and sys.path; set runtime_env.working_dir)") from None
        raise BuildError(loc, _user_traceback(app.import_path)) from None
    except BaseException:
        raise BuildError(loc, _user_traceback(app.import_path)) from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise BuildError(loc, f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Deployment):
        target = target.bind()
    elif callable(target) and not isinstance(target, type | Application):
        try:
            target = target(app.args) if app.args else target()
        except BaseException:
            raise BuildError(loc, _user_traceback(app.import_path)) from None
        if isinstance(target, Deployment):
            target = target.bind()
    elif app.args:
        raise BuildError((*where, "args"), f"{app.import_path!r} is an application, not a "
                         "function building one: it takes no args")
    if not isinstance(target, Application):
        raise BuildError(loc, f"{app.import_path!r} is {type(target).__name__}, not an "
                         "application, a deployment, or a function returning an application")
    return target


def _user_traceback(import_path: str) -> str:
    exc_type, exc, tb = sys.exc_info()
    while tb is not None and (tb.tb_frame.f_code.co_filename in (__file__, importlib.__file__)
                              or tb.tb_frame.f_code.co_filename.startswith("<frozen ")):
        tb = tb.tb_next  # the user's frames only
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    return f"importing {import_path!r} raised {exc_type.__name__ if exc_type else 'an error'}:\n{text}"


def _override(node: Application, overrides: dict[str, tuple[int, DeploymentSchema]],
              seen: set[str], where: Loc) -> Application:
    """The tree with every deployment named in ``overrides`` given the file's options."""
    memo: dict[int, Application] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, Application):
            if id(value) not in memo:
                memo[id(value)] = rebuild(value)
            return memo[id(value)]
        if type(value) in (list, tuple):
            return type(value)(visit(v) for v in value)
        if type(value) is dict:
            return {k: visit(v) for k, v in value.items()}
        return value

    def rebuild(app: Application) -> Application:
        dep = app.deployment
        seen.add(dep.name)
        if dep.name in overrides:
            index, schema = overrides[dep.name]
            dep = _apply_options(dep, schema, (*where, "deployments", index))
        return Application(dep, tuple(visit(a) for a in app.init_args),
                           {k: visit(v) for k, v in app.init_kwargs.items()})

    result: Application = visit(node)
    return result


def _apply_options(dep: Deployment, schema: DeploymentSchema, loc: Loc) -> Deployment:
    options = {k: v for k, v in schema.user_options().items() if k not in _CLUSTER_ONLY}
    ignored = sorted(set(schema.user_options()) & _CLUSTER_ONLY)
    if ignored:
        logger.info("Deployment %r: %s ignored on one machine.", dep.name, ", ".join(ignored))
    actor = options.get("ray_actor_options")
    if actor is not None:
        options["ray_actor_options"] = {k: v for k, v in actor.items()
                                        if k in _RAY_ACTOR_KEYS and v not in (None, {})} or None
    for key, value in options.items():
        try:
            dep = dep.options(**{key: value})
        except (TypeError, ValueError) as exc:
            raise BuildError((*loc, key), str(exc)) from None
    return dep


# ----------------------------------------------------------------- subprocess


class SpareBuilder:
    """One builder process started ahead, its imports done, waiting for its request:
    a deploy then costs no Python start.  Each process builds once (a fresh import of
    the user's code every time); the next spare is started by ``warm`` once the deploy
    is done, so it doesn't compete with the replicas starting."""

    def __init__(self) -> None:
        self._spare: asyncio.Task[asyncio.subprocess.Process] | None = None

    def warm(self) -> None:
        if self._spare is None:
            self._spare = asyncio.ensure_future(_spawn(None))

    def take(self) -> asyncio.Task[asyncio.subprocess.Process]:
        spare = self._spare if self._spare is not None else asyncio.ensure_future(_spawn(None))
        self._spare = None
        return spare

    async def aclose(self) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            proc = await spare
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _spawn(env: dict[str, str] | None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ladle._api.builder", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)


async def build_in_subprocess(app: ServeApplicationSchema, index: int, base_dir: Path,
                              env: dict[str, str] | None = None,
                              spare: SpareBuilder | None = None) -> AppTarget:
    """``build`` in a new Python process (a spare one if given); raises BuildError as
    ``build`` would."""
    request = json.dumps({"app": app.model_dump(mode="json", exclude_unset=True),
                          "index": index, "base_dir": str(base_dir)}).encode()
    proc = await (spare.take() if spare is not None and env is None else _spawn(env))
    try:
        out, err = await proc.communicate(request)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    try:
        kind, value = pickle.loads(out)
    except Exception:
        tail = err.decode(errors="replace").strip()[-2000:]
        raise BuildError(("applications", index, "import_path"),
                         f"building the application failed (exit {proc.returncode}):\n"
                         f"{tail}") from None
    if kind == "error":
        raise BuildError(tuple(value[0]), value[1])
    target: AppTarget = value
    return target


def main() -> None:
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what user code prints goes to stderr, not into the answer
    raw = sys.stdin.buffer.read()
    if not raw:
        os._exit(0)  # a spare whose controller went away
    request = json.loads(raw)
    app = ServeApplicationSchema.model_validate(request["app"])
    try:
        result: tuple[str, Any] = ("ok", build(app, request["index"], Path(request["base_dir"])))
    except BuildError as exc:
        result = ("error", (list(exc.loc), exc.message))
    answer.write(pickle.dumps(result))
    answer.flush()
    sys.stdout.flush()
    os._exit(0)  # don't run the user's atexit hooks or wait for their threads


if __name__ == "__main__":
    main()
