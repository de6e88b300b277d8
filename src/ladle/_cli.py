"""The ``ladle`` command: ``ladle run module:app``, ``ladle status``, ``ladle shutdown``.

``run`` imports an application and serves it in the foreground until Ctrl-C
(SIGINT), SIGTERM or ``ladle shutdown``, then shuts it down and exits 0.
``status`` and ``shutdown`` find the newest local instance through the
``current`` file (``_backends/local/current.py``) and talk to its controller
over the control socket.  Exit codes: 0 done, 1 an error (bad import path,
user code that raised, no running instance), 2 bad arguments (argparse).
Only this module decides exit codes; the library never exits.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any


class _Failed(Exception):
    """A one-line error for the user: printed without a traceback, exit code 1."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``ladle`` command line; returns the exit code."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="ladle", description="Serve Python models and "
                                     "business logic with Ray Serve's API, on one machine.")
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run an application in the foreground until Ctrl-C")
    run.add_argument("import_path", metavar="IMPORT_PATH",
                     help="'module:attribute' (or 'module.attribute'): an application, a "
                     "deployment, or a function returning an application")
    run.add_argument("--app-dir", default=".",
                     help="directory added to sys.path to import from (default: .)")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default=None, help="HTTP route prefix of the "
                     "application (default: the deployment's, else /)")
    run.add_argument("--host", default="127.0.0.1",
                     help="address the HTTP proxy listens on (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000,
                     help="port the HTTP proxy listens on (default: 8000; 0 picks a free one)")
    commands.add_parser("status", help="show the applications of the running instance")
    commands.add_parser("shutdown", help="shut the running instance down")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status()
        return _shutdown()
    except _Failed as exc:
        print(f"ladle: error: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------ run


def _say(message: str) -> None:
    print(f"ladle: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from ._api import lifecycle
    from ._api.config import DEFAULT_ROUTE_PREFIX_UNSET
    from .serve import run, shutdown, start

    app_dir = str(Path(args.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops us as Ctrl-C does
    try:
        _say(f"importing {args.import_path!r} (app dir {app_dir})")
        app = _user_code(args.import_path, lambda: _load_application(args.import_path))
        route_prefix = (DEFAULT_ROUTE_PREFIX_UNSET if args.route_prefix is None
                        else args.route_prefix)
        try:
            start(http_options={"host": args.host, "port": args.port})
        except Exception as exc:
            raise _Failed(str(exc)) from None
        try:
            run(app, name=args.name, route_prefix=route_prefix)
        except Exception as exc:
            raise _Failed(f"application {args.name!r} failed to deploy: {exc}") from None
        prefix = lifecycle.status().applications[args.name].route_prefix
        where = (f"http://{args.host}:{lifecycle.http_port()}{prefix}" if prefix is not None
                 else "Python handles only (route_prefix=None)")
        _say(f"application {args.name!r} is ready at {where}; press Ctrl-C to stop")
        stopped = threading.Event()
        while lifecycle.running():
            stopped.wait(0.2)  # poll: `ladle shutdown` stops the instance from outside
        _say("the instance was shut down from outside; exiting")
    except KeyboardInterrupt:
        _say("shutting down (Ctrl-C again to force)")
    finally:
        signal.signal(signal.SIGINT, _force_exit)
        signal.signal(signal.SIGTERM, _force_exit)
        shutdown()
    _say("stopped")
    return 0


def _force_exit(signum: int, frame: Any) -> None:
    _say("forced exit")
    os._exit(1)  # replicas exit on their own once their stdin pipe closes


def _user_code(import_path: str, fn: Any) -> Any:
    """Call ``fn``; a user exception prints the user's traceback and fails in one line."""
    try:
        return fn()
    except (_Failed, KeyboardInterrupt):
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        ours = (__file__, importlib.__file__)
        while tb is not None and (tb.tb_frame.f_code.co_filename in ours or
                                  tb.tb_frame.f_code.co_filename.startswith("<frozen ")):
            tb = tb.tb_next  # show the user's frames, not the CLI's or importlib's
        traceback.print_exception(type(exc), exc, tb)
        raise _Failed(f"importing {import_path!r} raised {type(exc).__name__} "
                      "(traceback above)") from None


def _load_application(import_path: str) -> Any:
    from .serve import Application, Deployment

    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise _Failed(f"import path {import_path!r} must look like 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise _Failed(f"no module named {missing!r} (looked in the app dir and "
                          "sys.path; set --app-dir)") from None
        raise  # a module the user's code imports is missing: their traceback
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise _Failed(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Deployment):
        return target.bind()
    if callable(target) and not isinstance(target, type | Application):
        built = target()
        if isinstance(built, Deployment):
            return built.bind()
        if not isinstance(built, Application):
            raise _Failed(f"{import_path!r} returned {type(built).__name__}, not an "
                          "application (build one with `Deployment.bind()`)")
        return built
    if not isinstance(target, Application):
        raise _Failed(f"{import_path!r} is {type(target).__name__}, not an application, a "
                      "deployment, or a function returning an application")
    return target


# ---------------------------------------------------------- status, shutdown


def _current_address() -> str:
    from ._api.config import settings
    from ._backends.local import current
    from ._backends.local.backend import default_run_root

    run_dir = settings().run_dir
    found = current.read(Path(run_dir) if run_dir else default_run_root())
    if found is None:
        raise _Failed("no running instance")
    address: str = found["address"]
    return address


async def _call(address: str, method: str) -> Any:
    from ._backends.local.sockets import open_connection
    from .exceptions import ReplicaDiedError

    try:
        conn = await open_connection(address)
    except OSError:
        raise _Failed("no running instance") from None  # the file outlived its instance
    try:
        return await asyncio.wait_for(conn.call(method), 30)
    except ReplicaDiedError:
        raise _Failed("the instance went away during the call") from None
    finally:
        await conn.aclose()
        await asyncio.sleep(0)  # let the transport finish closing


def _status() -> int:
    raw = asyncio.run(_call(_current_address(), "status"))
    apps = {}
    for name, app in raw["applications"].items():
        deployments = {d: {"status": dep["status"], "replica_states": dep["replica_states"],
                           "message": dep["message"]} for d, dep in app["deployments"].items()}
        apps[name] = {"status": app["status"], "message": app["message"],
                      "route_prefix": app["route_prefix"], "deployments": deployments}
    print("\n".join(_yaml({"applications": apps})))
    return 0


def _shutdown() -> int:
    address = _current_address()

    async def shutdown_and_wait() -> None:
        await _call(address, "shutdown")
        # The controller answers first, then stops; it is gone once its socket is.
        for _ in range(300):
            try:
                await _call(address, "status")
            except _Failed:
                return
            await asyncio.sleep(0.1)
        raise _Failed(f"the instance at {address} did not shut down within 30s")

    asyncio.run(shutdown_and_wait())
    print("ladle: the instance was shut down", file=sys.stderr)
    return 0


def _yaml(value: dict[str, Any], indent: int = 0) -> list[str]:
    pad = " " * indent
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            lines.extend(_yaml(item, indent + 2))
        else:
            lines.append(f"{pad}{key}: {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{}"
    if value == "":
        return "''"
    if isinstance(value, str) and not re.fullmatch(r"[\w/.#-]+", value):
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar
    return str(value)
