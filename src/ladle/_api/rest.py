"""The instance's REST API, with Ray's paths, on 127.0.0.1 (port 8265 by default).

  GET    /api/serve/applications/   the instance (``ServeInstanceDetails``, JSON)
  PUT    /api/serve/applications/   deploy a config (``ServeDeploySchema``, JSON or YAML):
                                    400 naming every wrong field, before anything changes
  DELETE /api/serve/applications/   delete every application (the instance stays up)

Every request must carry ``Authorization: Bearer <token>``, the token in the
instance's run directory (0600: only its user can read it); it is compared in
constant time, before the body is read.  Bodies are JSON or YAML and never
unpickled.  The header ``X-Ladle-App-Dir`` says where relative import paths
and working dirs of a PUT are resolved (``ladle deploy`` sends its own
directory).  A small HTTP/1.1 server of its own: one request per
connection, bounded headers and body, a deadline for reading them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._control.controller import Controller
from .._core.errors import LadleError

if TYPE_CHECKING:
    from .config_file import Problem

logger = logging.getLogger("ladle")

PATH = "/api/serve/applications/"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
READ_TIMEOUT_S = 30.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
            413: "Content Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class RestApi:
    """Serves the REST API for one controller (on the controller's loop)."""

    def __init__(self, controller: Controller, token: str, options: dict[str, Any],
                 token_path: Path, build_env: Callable[[], dict[str, str]] | None = None) -> None:
        self._controller = controller
        self._token = token.encode()
        self._options = options
        self._token_path = token_path
        self._build_env = build_env
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._spare: Any = None  # a SpareBuilder, from the first deploy on

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=MAX_HEADER_BYTES)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._spare is not None:
            await self._spare.aclose()

    def prepare(self) -> None:
        """Start a spare builder now, so the first deploy doesn't wait for one."""
        from .builder import SpareBuilder

        if self._spare is None:
            self._spare = SpareBuilder()
        self._spare.warm()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    status, body = await self._handle(reader)
            except TimeoutError:
                status, body = 408, {"error": "request not received in time"}
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                status, body = 400, {"error": "malformed request"}
            data = json.dumps(body).encode()
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\nConnection: close\r\n")
            if status == 401:
                head += 'WWW-Authenticate: Bearer realm="ladle"\r\n'
            writer.write(head.encode() + b"\r\n" + data)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, Any]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self._token):
            return 401, {"error": "this API needs 'Authorization: Bearer <token>', the "
                                  f"token in {self._token_path} (readable by its user only)"}
        path = target.split("?", 1)[0]
        if path.rstrip("/") != PATH.rstrip("/"):
            return 404, {"error": f"no such path: {path} (try {PATH})"}
        if method == "GET":
            from .declarative import details  # not at import: the controller starts faster

            return 200, details(self._controller.status(), self._options)
        if method == "DELETE":
            for name in list(self._controller.status()["applications"]):
                await self._controller.delete(name)
            return 200, {}
        if method != "PUT":
            return 405, {"error": f"{method} is not allowed on {PATH}"}
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return 411, {"error": "send the body with a Content-Length"}
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY_BYTES:
            return 413, {"error": f"a config is at most {MAX_BODY_BYTES} bytes"}
        text = (await reader.readexactly(length)).decode("utf-8", errors="replace")
        app_dir = Path(headers.get("x-ladle-app-dir") or "/")
        return await self._put(text, app_dir)

    async def _put(self, text: str, app_dir: Path) -> tuple[int, Any]:
        from .config_file import ConfigError, parse_text, validate
        from .declarative import deploy_config

        try:
            data, lines = parse_text(text)  # YAML is a superset of JSON
            config = validate(data, lines, base_dir=app_dir)
            env = self._build_env() if self._build_env is not None else None
            if self._spare is None:
                self.prepare()
            names = await deploy_config(self._controller, config, app_dir, wait=False,
                                        env=env, tasks=self._tasks, spare=self._spare)
        except ConfigError as exc:
            return 400, {"error": str(exc), "errors": [_problem(p) for p in exc.problems]}
        except LadleError as exc:
            return 400, {"error": str(exc), "errors": [{"loc": [], "msg": str(exc)}]}
        return 200, {"applications": names}


def _problem(problem: Problem) -> dict[str, Any]:
    from .config_file import format_loc

    return {"loc": list(problem.loc), "field": format_loc(problem.loc), "msg": problem.message,
            "line": problem.line}
