"""The controller process of a long-lived local instance: ``python -m ladle._api.instance_main DIR``.

Started (and restarted when it dies) by the supervisor (``_backends/local/
supervisor.py``).  It builds the controller on a local backend whose children
get the supervisor's lifeline, then:

1. opens the control socket, answering nothing on it yet;
2. loads the saved state (``state.json``) if there is one and restores it,
   adopting the replicas and the proxy still alive (else starts the proxy
   as ``options.json`` says); only then does the socket answer, so processes
   reconnecting after a restart never see an empty instance; then the REST API;
3. writes ``instance.json`` (where it all is) and, the first time, tells the
   waiting ``ladle start`` it is ready;
4. serves until shut down (``ladle shutdown``, ``serve.shutdown()``, or
   SIGTERM), then exits 0: the supervisor removes the directory and exits.

An instance that can't start (a port taken) exits with ``FATAL``: the
supervisor does not retry it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from .._backends.local import instance
from .._backends.local.backend import LocalBackend, process_start_time, write_private
from .._backends.local.proctitle import set_cmdline
from .._backends.local.supervisor import FATAL
from .._control.controller import Controller
from .._control.store import FileStore
from .._core.errors import LadleError
from .._serving.proxy import ProxyConfig
from .rest import RestApi

logger = logging.getLogger("ladle")


def _token(directory: Path) -> str:
    path = directory / "token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        write_private(path, token)
        return token


async def serve(directory: Path) -> int:
    options: dict[str, Any] = json.loads((directory / "options.json").read_text())
    lifeline = instance.lifeline_fds()
    backend = LocalBackend(directory, lifeline_fd=lifeline[0] if lifeline else None,
                           owns_run_dir=False)
    store = FileStore(directory)
    controller = Controller(backend, store)
    state = store.load()
    restarted = state is not None
    try:
        # The socket first (its address goes to every process started), answering only
        # once the state is back.
        await controller.start(restoring=True)
        if state is not None:
            await controller.restore(state)
            if state.get("shutting_down"):
                await controller.shutdown()
                return 0
        else:
            await controller.restore({})
        rest = RestApi(controller, _token(directory), options, directory / "token")
        starting = [rest.start(options.get("rest_host", "127.0.0.1"),
                               options.get("rest_port", 8265))]
        if state is None and options.get("proxy_location", "HeadOnly") not in ("Disabled",
                                                                               "NoServer"):
            starting.append(controller.start_proxy(ProxyConfig(
                host=options.get("http_host", "127.0.0.1"), port=options.get("http_port", 8000))))
        rest_port, *_ = await asyncio.gather(*starting)
    except (LadleError, OSError) as exc:
        await controller.shutdown()
        if restarted:
            raise  # the supervisor retries: the port may be free again soon
        instance.report_ready(None, str(exc))
        return FATAL
    info = {"address": controller.address, "http_host": options.get("http_host", "127.0.0.1"),
            "http_port": controller.http_port,
            "rest_url": f"http://{options.get('rest_host', '127.0.0.1')}:{rest_port}",
            "controller_pid": os.getpid(), "controller_start": process_start_time(os.getpid()),
            "dir": str(directory), "restarted": restarted}
    write_private(directory / "instance.json", json.dumps(info))
    instance.report_ready(info)
    # What the first deploy needs (pydantic, the schema, the builder), loaded now rather
    # than while it waits.
    await asyncio.to_thread(importlib.import_module, "ladle._api.declarative")
    rest.prepare()
    logger.info("ladle instance %s: controller %s, HTTP %s, REST %s",
                "restored" if restarted else "started", controller.address,
                f"{info['http_host']}:{info['http_port']}" if info["http_port"] else "off",
                info["rest_url"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    # Shutdown comes over the control socket (``ladle shutdown``) or as SIGTERM.
    stopped = asyncio.ensure_future(stop.wait())
    closed = asyncio.ensure_future(controller.wait_closed())
    await asyncio.wait([stopped, closed], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    await rest.aclose()
    if not controller.closed:
        await controller.shutdown()
    await closed
    return 0


def main() -> None:
    directory = Path(sys.argv[1])
    set_cmdline(f"ladle::controller {directory}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s ladle: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    from .._core.loop import new_event_loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    code = loop.run_until_complete(serve(directory))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
