"""The public surface: ladle.serve mirrors ray.serve name for name, and importing is free."""

from __future__ import annotations

import subprocess
import sys

import ladle
import ladle.exceptions
import ladle.handle
from ladle import serve
from ladle.serve import schema


def test_all_names_exist() -> None:
    for module in (ladle, serve, serve.handle, serve.exceptions, serve.config, schema,
                   ladle.handle, ladle.exceptions):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"


def test_ray_serve_names() -> None:
    expected = {"deployment", "run", "start", "shutdown", "delete", "status", "batch",
                "multiplexed", "get_multiplexed_model_id", "get_replica_context",
                "get_app_handle", "get_deployment_handle", "Application", "Deployment",
                "HTTPOptions", "AutoscalingConfig"}
    assert expected <= set(serve.__all__)
    assert {"DeploymentHandle", "DeploymentResponse",
            "DeploymentResponseGenerator"} <= set(serve.handle.__all__)
    assert {"RayServeException", "BackPressureError", "RequestCancelledError",
            "DeploymentUnavailableError"} <= set(serve.exceptions.__all__)


def test_short_paths_are_the_same_objects() -> None:
    assert serve.handle.DeploymentHandle is ladle.handle.DeploymentHandle
    assert serve.exceptions.BackPressureError is ladle.exceptions.BackPressureError
    assert ladle.exceptions.RayServeException is ladle.exceptions.LadleError
    for name in ("BackPressureError", "RequestCancelledError", "DeploymentUnavailableError",
                 "ReplicaDiedError", "HandleClosedError", "RemoteError"):
        assert issubclass(getattr(ladle.exceptions, name), ladle.exceptions.RayServeException)


def test_import_does_nothing() -> None:
    code = (
        "import sys, logging\n"
        "import ladle, ladle.serve, ladle.handle, ladle.exceptions\n"
        "assert 'ray' not in sys.modules, 'importing ladle imported ray'\n"
        "assert not logging.getLogger('ladle').handlers\n"
        "import threading; assert threading.active_count() == 1, 'a thread was started'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
