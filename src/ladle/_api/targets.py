"""From an ``Application`` (a tree of bound deployments) to the controller's targets.

``build_app_target`` flattens the tree: each bound deployment becomes a
``DeploymentTarget`` (its code and constructor arguments serialized, its
options resolved), and a bound child passed to ``.bind()`` becomes a
``DeploymentHandle`` to it.  A target's ``code_version`` changes when its
code does: for code from a module file, the file's contents count, so
editing it and deploying again (a config, ``--reload``) rolls the replicas,
and building it again unchanged in another process does not; a changed
``user_config`` or replica count never does.
"""

from __future__ import annotations

import hashlib
import os
import sys
import weakref
from typing import Any

from .._control.autoscaling import AutoscalingPolicy
from .._control.controller import AppTarget
from .._control.deployment_state import DeploymentTarget
from .._core.errors import LadleError
from .._core.serialization import dumps
from .._core.types import DeploymentID
from .._serving.asgi import is_ingress_class
from .._serving.handle import DeploymentHandle
from .config import settings
from .deployment import Application, Deployment


def build_app_target(app: Application, name: str, route_prefix: str | None,
                     extras: dict[str, Any] | None = None) -> AppTarget:
    """Flatten the bound tree into deployment targets; bound children become handles."""
    targets: dict[str, DeploymentTarget] = {}
    seen: dict[int, str] = {}
    start_timeout_s = settings().start_timeout_s

    def visit(node: Application) -> str:
        if id(node) in seen:
            return seen[id(node)]
        dep = node.deployment
        dname = dep.name
        if dname in targets:
            suffix = 1
            while f"{dname}_{suffix}" in targets:
                suffix += 1
            dname = f"{dname}_{suffix}"
        seen[id(node)] = dname
        targets[dname] = None  # type: ignore[assignment]  # reserve the name
        args = tuple(replace_apps(a) for a in node.init_args)
        kwargs = {k: replace_apps(v) for k, v in node.init_kwargs.items()}
        targets[dname] = make_target(dep, dname, args, kwargs)
        if not dep.is_function and is_ingress_class(dep.func_or_class):
            asgi_ingresses.append(dname)
        return dname

    def replace_apps(value: Any) -> Any:
        if isinstance(value, Application):
            return DeploymentHandle(visit(value), name)
        if isinstance(value, Deployment):
            raise TypeError(f"Deployment '{value.name}' was passed to `.bind()` unbound; "
                            f"pass `{value.name}.bind()` instead.")
        if type(value) in (list, tuple):
            return type(value)(replace_apps(v) for v in value)
        if type(value) is dict:
            return {k: replace_apps(v) for k, v in value.items()}
        return value

    def make_target(dep: Deployment, dname: str, args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> DeploymentTarget:
        try:
            code = _serialize_code(dep.func_or_class)
        except Exception as exc:
            raise TypeError(f"Could not serialize deployment '{dname}' "
                            f"({dep.func_or_class!r}): {exc}") from exc
        try:
            init = dumps((args, kwargs))
        except Exception as exc:
            raise TypeError(f"Could not serialize the arguments bound to deployment "
                            f"'{dname}': {exc}") from exc
        config = dep.config
        autoscaling = config.resolved_autoscaling()
        policy = None
        if autoscaling is not None:
            policy = AutoscalingPolicy(
                min_replicas=autoscaling.min_replicas, max_replicas=autoscaling.max_replicas,
                initial_replicas=autoscaling.initial_replicas,
                target_ongoing_requests=autoscaling.target_ongoing_requests,
                upscale_delay_s=autoscaling.upscale_delay_s,
                downscale_delay_s=autoscaling.downscale_delay_s,
                upscaling_factor=autoscaling.get_upscaling_factor(),
                downscaling_factor=autoscaling.get_downscaling_factor(),
                metrics_interval_s=autoscaling.metrics_interval_s)
        version = config.version or hashlib.sha256(
            _code_identity(dep.func_or_class, code) + init
            + repr((config.max_ongoing_requests,)).encode()).hexdigest()[:16]
        return DeploymentTarget(
            deployment_id=DeploymentID(dname, name), serialized_callable=code,
            serialized_init=init, is_function=dep.is_function, code_version=version,
            num_replicas=config.num_replicas if isinstance(config.num_replicas, int) else 1,
            autoscaling=policy, max_ongoing_requests=config.max_ongoing_requests,
            max_queued_requests=config.max_queued_requests, user_config=config.user_config,
            health_check_period_s=config.health_check_period_s,
            health_check_timeout_s=config.health_check_timeout_s,
            graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            graceful_shutdown_wait_loop_s=config.graceful_shutdown_wait_loop_s,
            start_timeout_s=start_timeout_s, extras=dict(extras or {}))

    asgi_ingresses: list[str] = []
    ingress = visit(app)
    if len(asgi_ingresses) > 1:
        # As Ray Serve: HTTP reaches only the ingress, so a second app would never serve.
        raise LadleError(f"Found multiple FastAPI deployments in application '{name}' "
                         f"({', '.join(sorted(asgi_ingresses))}): only one deployment of an "
                         "application may use @serve.ingress.")
    return AppTarget(name, route_prefix, ingress, tuple(targets.values()))


# Serialized code by class/function.  Unpickling a by-value class in this process (local
# testing mode) updates the class in place and changes its next pickle's bytes, which would
# make the same code look like a new version (restarting replicas on a user_config change).
_serialized_code: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def _serialize_code(func_or_class: Any) -> bytes:
    code = _serialized_code.get(func_or_class)
    if code is None:
        code = _serialized_code[func_or_class] = dumps(func_or_class)
    return code




def _code_identity(func_or_class: Any, code: bytes) -> bytes:
    """What makes two builds of a deployment's code the same version.

    Code from a module file: its module, name, the file's contents and the code
    objects of its methods (two classes of one name in one file differ by those).
    Not its pickle: a class shadowed by its ``@serve.deployment`` is pickled by
    value, with an id that differs in every process.  Else (``__main__``, the REPL):
    the pickle itself, stable within this process (``_serialize_code``).
    """
    module = sys.modules.get(getattr(func_or_class, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or not path:
        return code
    digest = _file_digest(path)
    if digest is None:
        return code
    name = f"{module.__name__}:{getattr(func_or_class, '__qualname__', '')}".encode()
    return name + digest + _shape(func_or_class)


def _shape(obj: Any) -> bytes:
    """The code of a function, or of every function in a class, as stable bytes."""
    if isinstance(obj, type):
        parts = []
        for name, value in sorted(vars(obj).items()):
            code = getattr(getattr(value, "__func__", value), "__code__", None)
            if code is not None:
                parts.append(name.encode() + _code_bytes(code))
        return b"".join(parts)
    code = getattr(obj, "__code__", None)
    return b"" if code is None else _code_bytes(code)


def _code_bytes(code: Any) -> bytes:
    consts = b"".join(_code_bytes(c) if hasattr(c, "co_code") else _const_bytes(c)
                      for c in code.co_consts)
    return (bytes(code.co_code) + str(code.co_firstlineno).encode() + consts
            + repr(code.co_names).encode())


def _const_bytes(value: Any) -> bytes:
    if isinstance(value, frozenset):  # its order follows the (per process) string hash
        return repr(sorted(map(repr, value))).encode()
    return repr(value).encode()


def _file_digest(path: str) -> bytes | None:
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (path, stat.st_mtime_ns, stat.st_size)
    digest = _digests.get(key)
    if digest is None:
        with open(path, "rb") as f:
            digest = _digests[key] = hashlib.sha256(f.read()).digest()
    return digest


_digests: dict[tuple[str, int, int], bytes] = {}


def client_extras() -> dict[str, Any]:
    """Where this process imports from: a replica started elsewhere (by a long-lived
    instance's controller) needs the same to unpickle code pickled by reference."""
    return {"sys_path": [p for p in sys.path if p], "cwd": os.getcwd()}
