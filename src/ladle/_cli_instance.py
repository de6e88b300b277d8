"""The ``ladle`` commands of a long-lived instance: ``start``, ``deploy``, ``build``, ``config``.

``start`` brings up a detached instance (``_backends/local/instance.py``)
and prints where it is.  ``deploy`` checks a config file here first (every
wrong field with its line), then PUTs it to the instance's REST API with the
token from the run directory, and follows the deploy until every
application runs (or one fails: its deployment and the user's traceback are
printed).  ``build`` writes a config for import paths; ``config`` prints the
configs in effect.  Also here: finding the instance to talk to
(``current_address``) and calls over its control socket, for ``_cli.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class Failed(Exception):
    """A one-line error for the user: printed without a traceback, exit code 1."""


def say(message: str) -> None:
    print(f"ladle: {message}", file=sys.stderr, flush=True)


_CLI_FILE = str(Path(__file__).with_name("_cli.py"))


def add_commands(commands: Any) -> None:
    start = commands.add_parser("start", help="start a long-lived instance in the background "
                                "(controller + HTTP proxy + REST API)")
    start.add_argument("--http-host", default="127.0.0.1",
                       help="address the HTTP proxy listens on (default: 127.0.0.1)")
    start.add_argument("--http-port", type=int, default=8000,
                       help="port of the HTTP proxy (default: 8000; 0 picks a free one)")
    start.add_argument("--proxy-location", default="HeadOnly",
                       choices=["HeadOnly", "EveryNode", "Disabled", "NoServer"],
                       help="where HTTP proxies run (default: HeadOnly; Disabled: no HTTP)")
    start.add_argument("--dashboard-port", type=int, default=8265,
                       help="port of the REST API on 127.0.0.1 (default: 8265, as Ray's "
                       "dashboard; 0 picks a free one)")
    deploy = commands.add_parser("deploy", help="deploy a config file (Ray's "
                                 "ServeDeploySchema) to the running instance")
    deploy.add_argument("config_file", metavar="CONFIG_FILE")
    deploy.add_argument("--app-dir", default=".", help="directory import paths and relative "
                        "working dirs are resolved in (default: .)")
    deploy.add_argument("--address", "-a", default=None,
                        help="the REST API's URL (default: the running instance's)")
    deploy.add_argument("--no-wait", action="store_true",
                        help="return once the config is accepted, without waiting for the "
                        "applications to run")
    build = commands.add_parser("build", help="write a config file for applications")
    build.add_argument("import_paths", nargs="+", metavar="IMPORT_PATH")
    build.add_argument("--app-dir", default=".", help="directory to import from (default: .)")
    build.add_argument("--output-path", "-o", default=None,
                       help="file to write (default: print it)")
    config = commands.add_parser("config", help="print the config of the applications "
                                 "deployed from config files")
    config.add_argument("--name", "-n", default=None, help="only this application")
    config.add_argument("--address", "-a", default=None,
                        help="the REST API's URL (default: the running instance's)")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "start":
        return _start(args)
    if args.command == "deploy":
        return _deploy(args)
    if args.command == "build":
        return _build(args)
    return _config(args)


def _run_dir() -> str | None:
    # Read here rather than through settings(): that loads pydantic, which these
    # commands otherwise never need (they start faster without).
    return os.environ.get("LADLE_RUN_DIR", "").strip() or None


# ---------------------------------------------------------------- finding it


def long_lived() -> tuple[dict[str, Any], Path] | None:
    """The running long-lived instance's ``instance.json`` and run root, if any."""
    from ._backends.local import instance

    address = os.environ.get("LADLE_ADDRESS", "").strip()
    try:
        if address:
            from ._control import client
            from ._core.errors import LadleError

            try:
                where = client.find(_run_dir(), address)
            except LadleError as exc:
                raise Failed(str(exc)) from None
            if where is None:
                return None
            return where.info, where.root or instance.run_root(_run_dir())
        root = instance.run_root(_run_dir())
        deadline = time.monotonic() + 10.0
        found = instance.find(root)
        while found is not None and found.get("starting") and time.monotonic() < deadline:
            time.sleep(0.02)  # `ladle start` is bringing it up right now
            found = instance.find(root)
    except instance.InstanceError as exc:
        raise Failed(str(exc)) from None
    if found is None or found.get("starting"):
        return None
    return found, root


def current_address() -> tuple[str, Path | None]:
    """The control address of the long-lived instance, else of the newest ``ladle run``."""
    from ._backends.local import current
    from ._backends.local.instance import run_root

    found = long_lived()
    if found is not None:
        return found[0]["address"], found[1]
    recorded = current.read(run_root(_run_dir()))
    if recorded is None:
        raise Failed("no running instance")
    address: str = recorded["address"]
    return address, None


async def call(address: str, method: str, *args: Any) -> Any:
    from ._backends.local.sockets import open_connection
    from .exceptions import ReplicaDiedError

    try:
        conn = await open_connection(address)
    except OSError:
        raise Failed("no running instance") from None  # the file outlived its instance
    try:
        return await asyncio.wait_for(conn.call(method, *args), 30)
    except ReplicaDiedError:
        raise Failed("the instance went away during the call") from None
    finally:
        await conn.aclose()
        await asyncio.sleep(0)  # let the transport finish closing


# --------------------------------------------------------------------- start


def _start(args: argparse.Namespace) -> int:
    # Only the instance's directory code: nothing of the runtime is needed to start one.
    from ._backends.local import instance

    root = instance.run_root(_run_dir())
    try:
        found = instance.find(root)
        if found is not None:
            say("an instance is already running")
            _print_where(found)
            return 0
        location = "Disabled" if args.proxy_location == "NoServer" else args.proxy_location
        options = {"http_host": args.http_host, "http_port": args.http_port,
                   "proxy_location": location, "rest_port": args.dashboard_port}
        started = time.monotonic()
        info = instance.start(root, options)
    except instance.InstanceError as exc:
        raise Failed(str(exc)) from None
    say(f"instance started in {time.monotonic() - started:.2f}s")
    _print_where(info)
    return 0


def _print_where(info: dict[str, Any]) -> None:
    http = (f"http://{info['http_host']}:{info['http_port']}" if info.get("http_port")
            else "off (proxy_location Disabled)")
    print(f"controller: {info['address']}\n"
          f"HTTP:       {http}\n"
          f"REST API:   {info['rest_url']} (token in {Path(info['dir']) / 'token'})\n"
          f"run dir:    {info['dir']}\n"
          "`serve.run()` in any script of this user now deploys here; "
          "`ladle shutdown` stops it.", flush=True)


# -------------------------------------------------------------------- deploy


class _Rest:
    """The instance's REST API, with the token from its run directory."""

    def __init__(self, address: str | None) -> None:
        found = long_lived()
        if found is None and address is None:
            raise Failed("no running instance (start one with `ladle start`)")
        if found is None:
            raise Failed(f"no running instance of this user to read the token of "
                         f"(the REST API at {address} needs it)")
        info, _ = found
        self.url = (address or info["rest_url"]).rstrip("/") + "/api/serve/applications/"
        try:
            self.token = (Path(info["dir"]) / "token").read_text().strip()
        except OSError as exc:
            raise Failed(f"can't read the instance's token: {exc}") from None

    def request(self, method: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.url, data=body, method=method, headers={
            "Authorization": f"Bearer {self.token}", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (urllib.error.URLError, OSError) as exc:
            raise Failed(f"the REST API at {self.url} does not answer: {exc}") from None


def _deploy(args: argparse.Namespace) -> int:
    from ._api import config_file

    path = Path(args.config_file)
    try:
        text = path.read_text()
        # YAML errors are caught here; the instance validates the rest (and answers with
        # the fields, given lines here), so this command needs no schema of its own.
        _, lines = config_file.parse_text(text, str(path))
    except OSError as exc:
        raise Failed(f"can't read {path}: {exc.strerror or exc}") from None
    except config_file.ConfigError as exc:
        raise Failed(str(exc)) from None
    rest = _Rest(args.address)
    started = time.monotonic()
    status, answer = rest.request("PUT", text.encode(), {
        "Content-Type": "application/x-yaml",
        "X-Ladle-App-Dir": str(Path(args.app_dir).resolve())})
    if status != 200:
        problems = [config_file.Problem(tuple(e["loc"]), e["msg"],
                                        config_file.locate(tuple(e["loc"]), lines))
                    for e in answer.get("errors", [])]
        if problems:
            raise Failed(str(config_file.ConfigError(problems, str(path))))
        raise Failed(answer.get("error", f"the instance answered {status}"))
    names = answer["applications"]
    say(f"config accepted: {', '.join(names) or 'no applications'}")
    if args.no_wait:
        return 0
    follow(lambda: rest.request("GET")[1], names)
    say(f"deployed in {time.monotonic() - started:.2f}s")
    return 0


def follow(get_details: Any, names: list[str], timeout_s: float = 600.0) -> None:
    """Print each application's progress until all of ``names`` run; Failed if one can't."""
    deadline = time.monotonic() + timeout_s
    printed: dict[str, str] = {}
    while True:
        apps = get_details()["applications"]
        waiting = False
        for name in names:
            app = apps.get(name)
            if app is None:
                waiting = True
                continue
            for dname, dep in app["deployments"].items():
                line = _progress(dep)
                if printed.get(f"{name}#{dname}") != line:
                    printed[f"{name}#{dname}"] = line
                    say(f"application {name!r}, deployment {dname!r}: {line}")
            if app["status"] == "DEPLOY_FAILED":
                raise Failed(f"application {name!r} failed to deploy:\n{app['message']}")
            if app["status"] != "RUNNING":
                waiting = True
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise Failed(f"the applications were not running after {timeout_s:.0f}s")
        time.sleep(0.05)


def _progress(dep: dict[str, Any]) -> str:
    target = dep["target_num_replicas"]
    states = [r["state"] for r in dep["replicas"]]
    running = states.count("RUNNING")
    text = f"{running}/{target} replicas running"
    if states.count("STARTING"):
        text += f", {states.count('STARTING')} starting"
    if states.count("STOPPING"):
        text += f", {states.count('STOPPING')} stopping"
    return f"{text} ({dep['status']})"


def run_config(path: Path, app_dir: Path) -> list[str]:
    """``ladle run config.yaml``: deploy its applications to this process's instance (or
    the long-lived one it joined) and wait until they run; their names."""
    from ._api import config_file, lifecycle
    from ._api.declarative import build_config
    from ._control.client import RemoteClient

    try:
        config = config_file.load(path)
        built = asyncio.run(build_config(config, app_dir))
    except config_file.ConfigError as exc:
        raise Failed(str(config_file.ConfigError(exc.problems, str(path)))) from None
    instance = lifecycle._instance
    assert instance is not None
    for name, (target, _) in built.items():
        say(f"deploying application {name!r}")
        try:
            instance.deploy(target)
        except Exception as exc:
            raise Failed(f"application {name!r} failed to deploy: {exc}") from None
    port = instance.http_port
    for name, (target, _) in built.items():
        where = (f"http://127.0.0.1:{port}{target.route_prefix}"
                 if target.route_prefix is not None and port else "Python handles only")
        say(f"application {name!r} is ready at {where}")
    if isinstance(instance, RemoteClient):
        say("press Ctrl-C to stop (and delete these applications)")
    else:
        say("press Ctrl-C to stop")
    return list(built)


# ------------------------------------------------------------ importing


def user_code(import_path: str, fn: Any) -> Any:
    """Call ``fn``; a user exception prints the user's traceback and fails in one line."""
    try:
        return fn()
    except (Failed, KeyboardInterrupt):
        raise
    except BaseException as exc:
        tb = exc.__traceback__
        ours = (__file__, importlib.__file__, _CLI_FILE)
        while tb is not None and (tb.tb_frame.f_code.co_filename in ours or
                                  tb.tb_frame.f_code.co_filename.startswith("<frozen ")):
            tb = tb.tb_next  # show the user's frames, not the CLI's or importlib's
        traceback.print_exception(type(exc), exc, tb)
        raise Failed(f"importing {import_path!r} raised {type(exc).__name__} "
                     "(traceback above)") from None


def load_application(import_path: str) -> Any:
    from .serve import Application, Deployment

    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    if not module_name or not attr:
        raise Failed(f"import path {import_path!r} must look like 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise Failed(f"no module named {missing!r} (looked in the app dir and "
                         "sys.path; set --app-dir)") from None
        raise  # a module the user's code imports is missing: their traceback
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise Failed(f"module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(target, Deployment):
        return target.bind()
    if callable(target) and not isinstance(target, type | Application):
        built = target()
        if isinstance(built, Deployment):
            return built.bind()
        if not isinstance(built, Application):
            raise Failed(f"{import_path!r} returned {type(built).__name__}, not an "
                         "application (build one with `Deployment.bind()`)")
        return built
    if not isinstance(target, Application):
        raise Failed(f"{import_path!r} is {type(target).__name__}, not an application, a "
                     "deployment, or a function returning an application")
    return target



# ------------------------------------------------------------ build, config


def _build(args: argparse.Namespace) -> int:
    from ._api.declarative import config_for, dump_yaml

    app_dir = str(Path(args.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    apps = [user_code(path, lambda path=path: load_application(path))
            for path in args.import_paths]
    from . import __version__

    text = (f"# This file was generated using the `ladle build` command on ladle "
            f"v{__version__}.\n\n" + dump_yaml(config_for(args.import_paths, apps)))
    if args.output_path is None:
        print(text, end="")
    else:
        Path(args.output_path).write_text(text)
        say(f"wrote {args.output_path}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from ._api.declarative import dump_yaml

    details = _Rest(args.address).request("GET")[1]
    configs = [app["deployed_app_config"] for name, app in details["applications"].items()
               if app.get("deployed_app_config") is not None
               and (args.name is None or name == args.name)]
    if args.name is not None and not configs:
        raise Failed(f"application {args.name!r} was not deployed from a config file")
    print("\n---\n\n".join(dump_yaml(c, blank_lines=False) for c in configs), end="")
    return 0
