"""The ``ladle`` command: parsing, exit codes, ``run``, ``status`` and ``shutdown``.

``run`` serves an application (an import path, or a config file) in the
foreground until Ctrl-C (SIGINT), SIGTERM or ``ladle shutdown``.  With a
long-lived instance running (``ladle start``) it deploys there and deletes
its applications when it stops; else the instance is this process's and
stops with it.  ``--reload`` redeploys when a file under the app dir
changes.  ``status`` and ``shutdown`` talk to the long-lived instance if one
runs, else to the newest ``ladle run`` (its ``current`` file); ``start``,
``deploy``, ``build`` and ``config`` are in ``_cli_instance.py``.

Exit codes: 0 done, 1 an error (bad import path or config, user code that
raised, no running instance), 2 bad arguments (argparse).  Only the CLI
decides exit codes; the library never exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import _cli_instance as instance_cmds
from ._cli_instance import Failed, load_application, say, user_code


def main(argv: list[str] | None = None) -> int:
    """Run the ``ladle`` command line; returns the exit code."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="ladle", description="Serve Python models and "
                                     "business logic with Ray Serve's API, on one machine.")
    parser.add_argument("--version", action="version", version=f"ladle {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run an application (or a config file) in the "
                              "foreground until Ctrl-C")
    run.add_argument("import_path", metavar="IMPORT_PATH_OR_CONFIG",
                     help="'module:attribute' (or 'module.attribute'): an application, a "
                     "deployment, or a function returning an application; or a config "
                     "file (.yaml/.yml/.json) as `ladle deploy` takes")
    run.add_argument("--app-dir", default=".",
                     help="directory added to sys.path to import from (default: .)")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default=None, help="HTTP route prefix of the "
                     "application (default: the deployment's, else /)")
    run.add_argument("--host", default="127.0.0.1",
                     help="address the HTTP proxy listens on (default: 127.0.0.1)")
    run.add_argument("--port", type=int, default=8000,
                     help="port the HTTP proxy listens on (default: 8000; 0 picks a free one)")
    run.add_argument("--reload", action="store_true",
                     help="redeploy (restarting the replicas) when a file under the app dir "
                     "changes; for development")
    status = commands.add_parser("status", help="show the applications of the running "
                                 "instance (Ray's `serve status` layout)")
    status.add_argument("--watch", "-w", action="store_true",
                        help="print it again whenever it changes, until Ctrl-C")
    status.add_argument("--name", "-n", default=None, help="only this application")
    shutdown = commands.add_parser("shutdown", help="shut the running instance down")
    shutdown.add_argument("--yes", "-y", action="store_true", help="(accepted, as in Ray)")
    instance_cmds.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "shutdown":
            return _shutdown()
        return instance_cmds.dispatch(args)
    except Failed as exc:
        print(f"ladle: error: {exc}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------ run


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _is_config(path: str) -> bool:
    return path.endswith((".yaml", ".yml", ".json"))


def _run(args: argparse.Namespace) -> int:
    from ._api import lifecycle

    app_dir = str(Path(args.app_dir).resolve())
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops us as Ctrl-C does
    names: list[str] = []
    try:
        deploy = _deployer(args, app_dir)
        names = deploy()
        if args.reload:
            _reload_until_stopped(app_dir, deploy)
        else:
            stopped = threading.Event()
            while lifecycle.running():
                stopped.wait(0.2)  # poll: `ladle shutdown` stops the instance from outside
        say("the instance was shut down from outside; exiting")
    except KeyboardInterrupt:
        say("shutting down (Ctrl-C again to force)")
    finally:
        signal.signal(signal.SIGINT, _force_exit)
        signal.signal(signal.SIGTERM, _force_exit)
        _stop_what_we_ran(names)
    say("stopped")
    return 0


def _deployer(args: argparse.Namespace, app_dir: str) -> Any:
    """A function that deploys what ``args`` names (again, for --reload); its app names."""
    from ._api import lifecycle
    from ._api.config import DEFAULT_ROUTE_PREFIX_UNSET
    from .serve import run, start

    try:
        start(http_options={"host": args.host, "port": args.port})
    except Exception as exc:
        raise Failed(str(exc)) from None
    if _is_config(args.import_path):
        path = Path(args.import_path).resolve()

        def deploy_config() -> list[str]:
            return instance_cmds.run_config(path, Path(app_dir))
        return deploy_config

    route_prefix = (DEFAULT_ROUTE_PREFIX_UNSET if args.route_prefix is None
                    else args.route_prefix)

    def deploy_import_path() -> list[str]:
        say(f"importing {args.import_path!r} (app dir {app_dir})")
        app = user_code(args.import_path, lambda: load_application(args.import_path))
        try:
            run(app, name=args.name, route_prefix=route_prefix)
        except Exception as exc:
            raise Failed(f"application {args.name!r} failed to deploy: {exc}") from None
        prefix = lifecycle.status().applications[args.name].route_prefix
        where = (f"http://{args.host}:{lifecycle.http_port()}{prefix}" if prefix is not None
                 else "Python handles only (route_prefix=None)")
        say(f"application {args.name!r} is ready at {where}; press Ctrl-C to stop")
        return [args.name]
    return deploy_import_path


def _stop_what_we_ran(names: list[str]) -> None:
    """An embedded instance stops; on a long-lived one only our applications go."""
    from ._api import lifecycle
    from ._control.client import RemoteClient

    instance = lifecycle._instance
    if isinstance(instance, RemoteClient) and not instance.closed:
        for name in names:
            try:
                lifecycle.delete(name)
            except Exception as exc:
                say(f"could not delete application {name!r}: {exc}")
        instance.leave()
        lifecycle._instance = None
    else:
        lifecycle.shutdown()


def _reload_until_stopped(app_dir: str, deploy: Any) -> None:
    """Redeploy whenever a file under ``app_dir`` changes (and the instance is up)."""
    from ._api import lifecycle

    snapshot = _files(app_dir)
    say(f"watching {app_dir} for changes")
    while lifecycle.running():
        time.sleep(0.25)
        now = _files(app_dir)
        if now == snapshot:
            continue
        changed = sorted(set(now.items()) ^ set(snapshot.items()))
        snapshot = now
        say(f"{Path(changed[0][0]).name} changed; redeploying")
        # A module imported by reference is read again by the replicas; drop ours so a
        # new import sees the new code too.
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) and str(module.__file__).startswith(app_dir):
                del sys.modules[name]
        try:
            deploy()
        except Failed as exc:
            say(f"error: {exc} (fix it and save again)")


def _files(root: str) -> dict[str, int]:
    found = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__pycache__"))]
        for name in files:
            if name.endswith((".py", ".yaml", ".yml", ".json")):
                path = os.path.join(directory, name)
                try:
                    found[path] = os.stat(path).st_mtime_ns
                except OSError:
                    pass
    return found


def _force_exit(signum: int, frame: Any) -> None:
    say("forced exit")
    os._exit(1)  # replicas exit on their own once their stdin pipe closes


# ---------------------------------------------------------- status, shutdown


def _status(args: argparse.Namespace) -> int:
    from ._api.declarative import dump_yaml, status_document

    address, _ = instance_cmds.current_address()
    last = None
    while True:
        raw = asyncio.run(instance_cmds.call(address, "status"))
        document = status_document(raw)
        if args.name is not None:
            if args.name not in document["applications"]:
                raise Failed(f"application {args.name!r} does not exist")
            document = document["applications"][args.name]
        text = dump_yaml(document, blank_lines=False)
        if text != last:
            if last is not None:
                print("---", flush=True)
            print(text, end="", flush=True)
            last = text
        if not args.watch:
            return 0
        try:
            time.sleep(0.5)
        except KeyboardInterrupt:
            return 0


def _shutdown() -> int:
    address, root = instance_cmds.current_address()

    async def shutdown_and_wait() -> None:
        await instance_cmds.call(address, "shutdown")
        # The controller answers first, then stops; it is gone once its socket is.
        for _ in range(600):
            try:
                await instance_cmds.call(address, "ping")
            except Failed:
                return
            await asyncio.sleep(0.05)
        raise Failed(f"the instance at {address} did not shut down within 30s")

    asyncio.run(shutdown_and_wait())
    if root is not None:
        from ._backends.local import instance

        if not instance.wait_gone(root, 30.0):
            raise Failed(f"the instance in {root} did not exit within 30s")
    print("ladle: the instance was shut down", file=sys.stderr)
    return 0
