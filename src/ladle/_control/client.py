"""Finding the controller or starting one, and talking to it from a driver process.

Where the controller runs is the client's business.  ``EmbeddedClient``
runs one on this process's background loop (no long-lived instance: the
applications die with the driver, as they always have).  ``RemoteClient``
talks to a long-lived instance's controller over its control socket; this
process then follows the controller as replicas do (``control_link``), so
handles route with the replica sets it pushes and never wait on it.  Both
answer the same calls; the API layer (``lifecycle.py``) holds one of them.

``find`` says whether a long-lived instance is running for this user
(``LADLE_ADDRESS``, else the run directory); ``start_detached`` starts one.
Calls over the socket survive a controller restart: they are sent again to
the restarted controller (every one of them is idempotent) until a deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._core.errors import LadleError, ReplicaDiedError
from .._core.loop import background_loop, running_loop
from .._core.snapshots import hub
from .._core.types import DeploymentID
from .._serving import control_link
from .controller import AppTarget, Controller

# How long a call keeps trying while the controller restarts (it comes back in well
# under a second; a deploy waits for replicas on top of that).
RECONNECT_DEADLINE_S = 30.0


@dataclass(frozen=True)
class InstanceAddress:
    """Where a long-lived instance is: its control socket and its directory."""

    address: str
    root: Path | None  # the run root (None when given as LADLE_ADDRESS=unix:...)
    info: dict[str, Any]


def find(run_dir_setting: str | None, address_setting: str | None) -> InstanceAddress | None:
    """The running long-lived instance of this user, or None.

    ``LADLE_ADDRESS`` (``unix:/path/controller.sock``, or a run directory) names one
    explicitly: then it must be running.  Raises LadleError for another user's
    instance or an explicit address that doesn't answer.
    """
    from .._backends.local import instance

    try:
        if address_setting:
            if address_setting.startswith("unix:"):
                path = Path(address_setting[5:])
                if not path.exists():
                    raise LadleError(f"LADLE_ADDRESS={address_setting}: no instance there.")
                return InstanceAddress(address_setting, path.parent.parent,
                                       {"address": address_setting})
            root = Path(address_setting)
            found = instance.find(root)
            if found is None:
                raise LadleError(f"LADLE_ADDRESS={address_setting}: no instance running there.")
        else:
            root = instance.run_root(run_dir_setting)
            found = instance.find(root)
            if found is None:
                return None
        deadline = time.monotonic() + 10.0
        while found is not None and found.get("starting"):
            if time.monotonic() > deadline:
                raise LadleError(f"The instance in {instance.instance_dir(root)} is starting "
                                 "and did not finish within 10s.")
            time.sleep(0.02)  # `ladle start` is bringing it up right now
            found = instance.find(root)
        if found is None:
            return None
    except instance.InstanceError as exc:
        raise LadleError(str(exc)) from None
    return InstanceAddress(found["address"], root, found)


def start_detached(run_dir_setting: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """Start a long-lived instance; its ``instance.json`` once it serves."""
    from .._backends.local import instance

    root = instance.run_root(run_dir_setting)
    try:
        if instance.find(root) is not None:
            raise LadleError(f"An instance is already running in {instance.instance_dir(root)}.")
        return instance.start(root, options)
    except instance.InstanceError as exc:
        raise LadleError(str(exc)) from None


class EmbeddedClient:
    """A Controller on this process's background loop."""

    kind = "embedded"

    def __init__(self, controller: Controller, local_testing: bool) -> None:
        self.controller = controller
        self.local_testing = local_testing
        self.loop = background_loop()

    def call(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Run a controller coroutine on its loop and wait for it from this thread."""
        if running_loop() is self.loop:
            coro.close()
            raise RuntimeError("This serve API can't be called from ladle's own loop.")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def lookup(self, fn: Any, *args: Any) -> Any:
        """Run a synchronous controller lookup on its loop (directly, if already on it)."""
        if running_loop() is self.loop:
            return fn(*args)  # user code of an in-process replica (local testing mode)
        return self.call(_apply(fn, *args))

    @property
    def closed(self) -> bool:
        return self.controller.closed

    @property
    def http_port(self) -> int | None:
        return self.controller.http_port

    def deploy(self, target: AppTarget) -> None:
        self.call(self.controller.deploy(target))

    def delete(self, name: str) -> None:
        self.call(self.controller.delete(name))

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.lookup(self.controller.status)
        return result

    def ingress(self, name: str) -> DeploymentID:
        result: DeploymentID = self.lookup(self.controller.ingress, name)
        return result

    def has_deployment(self, deployment_id: DeploymentID) -> bool:
        return bool(self.lookup(self.controller.has_deployment, deployment_id))

    def shutdown(self) -> None:
        self.call(self.controller.shutdown(), timeout_s=60)

    def leave(self) -> None:
        self.shutdown()  # what this process started dies with it


async def _apply(fn: Any, *args: Any) -> Any:
    return fn(*args)


class RemoteClient:
    """A long-lived instance's controller, over its control socket."""

    kind = "remote"
    local_testing = False

    def __init__(self, where: InstanceAddress) -> None:
        self.where = where
        self._http_port: int | None = where.info.get("http_port")
        self._closed = False
        self._link = control_link.install(where.address, background_loop())
        hub.closed = None

    def _call(self, method: str, *args: Any, deadline_s: float = RECONNECT_DEADLINE_S) -> Any:
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                return self._link.call_sync(method, *args)
            except (OSError, ReplicaDiedError) as exc:
                # The controller is restarting (or gone for good: then the deadline says so).
                if self._closed or time.monotonic() > deadline:
                    raise LadleError(f"The ladle instance at {self.where.address} does not "
                                     f"answer ({exc}).") from None
                time.sleep(0.01)

    @property
    def closed(self) -> bool:
        if self._closed:
            return True
        root = self.where.root
        if root is None:
            return False
        from .._backends.local import instance

        return instance.supervisor_pid(root) is None and instance.find(root) is None

    @property
    def http_port(self) -> int | None:
        return self._http_port

    def deploy(self, target: AppTarget) -> None:
        port = self._call("deploy", target)
        if port is not None:
            self._http_port = port

    def delete(self, name: str) -> None:
        self._call("delete", name)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("status")
        self._http_port = result.get("http_port", self._http_port)
        return result

    def ingress(self, name: str) -> DeploymentID:
        result: DeploymentID = self._call("ingress", name)
        return result

    def has_deployment(self, deployment_id: DeploymentID) -> bool:
        return bool(self._call("has_deployment", deployment_id))

    def shutdown(self) -> None:
        """Shut the whole instance down (every application) and wait until it is gone."""
        from .._backends.local import instance

        self._call("shutdown")
        self._closed = True
        self.leave()
        if self.where.root is not None and not instance.wait_gone(self.where.root, 60.0):
            raise LadleError(f"The instance in {self.where.root} did not shut down within 60s.")

    def leave(self) -> None:
        """Stop following the instance; its applications keep running."""
        self._closed = True
        control_link.uninstall()
