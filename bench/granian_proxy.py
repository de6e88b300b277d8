"""Bench-only prototype: ladle's HTTP proxy with granian in place of uvicorn.

``GranianProxy`` is ladle's ``Proxy`` (same ``ProxyApp``, middlewares, socket,
readiness and stop protocol) whose HTTP server is granian's *embedded* server
(``granian.server.embed.Server``, marked experimental by granian): it runs on
the proxy process's own event loop and serves the socket ladle already bound
(granian's ``SocketHolder(fd, is_uds, backlog)``, given a dup of the fd).
granian parses HTTP in a Rust runtime thread of the same process and hands
each request to the loop (``call_soon_threadsafe``, one asyncio task per
request with ``TaskImpl.asyncio``).

``use_granian_proxy()`` makes this process's controller start the proxy from
this class; the proxy process imports this module by reference (the bench
directory is on the ``sys.path`` it inherits).  Nothing in ``src/`` knows
about it, and granian is not a ladle dependency.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from ladle._serving.proxy import Proxy, ProxyConfig


class _GranianServer:
    """granian embedded, with the surface ``Proxy.run`` drives: ``serve()``, ``started``, ``should_exit``."""

    def __init__(self, app: Any, sock: socket.socket, config: ProxyConfig) -> None:
        from granian._granian import SocketHolder
        from granian.constants import HTTPModes, Interfaces
        from granian.http import HTTP1Settings
        from granian.server.embed import Server

        outer = self
        fd = os.dup(sock.fileno())  # granian owns (and closes) its copy of the listening socket

        class Embedded(Server):
            def _init_shared_socket(self) -> None:
                self._shd, self._sfd, self._ssp = SocketHolder(fd, False, 2048), fd, None

            def startup(self, spawn_target: Any, target_loader: Any) -> None:
                super().startup(spawn_target, target_loader)
                outer.started = True

        # granian has no idle keep-alive timeout for HTTP/1; the header read timeout is the nearest.
        read_ms = min(60_000, max(1, round(config.keep_alive_timeout_s * 1000)))
        self.started = False
        self._server = Embedded(
            app, address=config.host, port=sock.getsockname()[1], interface=Interfaces.ASGINL,
            http=HTTPModes.http1, websockets=True, backlog=2048, log_enabled=False,
            http1_settings=HTTP1Settings(header_read_timeout=read_ms))

    async def serve(self, sockets: Any = None) -> None:
        await self._server.serve()

    @property
    def should_exit(self) -> bool:
        return bool(self._server.interrupt_signal)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._server.stop()


class GranianProxy(Proxy):
    """ladle's proxy, served by granian: everything but the server is ``Proxy``'s."""

    async def _run_own_server(self, asgi: Any, sock: socket.socket) -> None:
        await self._run_uvicorn(asgi, sock)  # the same start/ready/stop sequence as uvicorn's

    async def _run_uvicorn(self, asgi: Any, sock: socket.socket) -> None:
        import ladle._serving.proxy as proxy_module

        config = self.config
        original = proxy_module._QuietServer
        proxy_module._QuietServer = lambda _uv_config: _GranianServer(asgi, sock, config)
        try:
            await super()._run_uvicorn(asgi, sock)
        finally:
            proxy_module._QuietServer = original


def use_granian_proxy() -> None:
    """Make this process's controller start ``GranianProxy`` (call before ``serve.start``)."""
    import ladle._control.controller as controller

    controller.Proxy = GranianProxy
