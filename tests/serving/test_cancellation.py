"""response.cancel(): before assignment, while running, downstream, and through asyncio tasks.

Replicas record what happened to each call in a file under ``tmp_path`` (one
line per event), which the test polls with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from ladle import serve
from ladle.exceptions import RequestCancelledError
from ladle.handle import DeploymentHandle
from tests.conftest import wait_for


def record(log: str, event: str) -> None:
    with open(log, "a") as f:
        f.write(event + "\n")


def events(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


@serve.deployment
class Recorder:
    """Async calls that record start/finish/cancel and block until released (a file)."""

    def __init__(self, log: str, release: str) -> None:
        self.log = log
        self.release = release

    async def block(self, tag: str) -> str:
        record(self.log, f"start:{tag}")
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            record(self.log, f"cancelled:{tag}")
            raise
        record(self.log, f"done:{tag}")
        return tag

    async def wait_forever(self, tag: str) -> None:
        record(self.log, f"start:{tag}")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            record(self.log, f"cancelled:{tag}")
            raise

    def quick(self, tag: str) -> str:
        record(self.log, f"quick:{tag}")
        return tag


def test_cancel_before_assignment_drops_the_request(tmp_path: Path) -> None:
    log, release = tmp_path / "log", tmp_path / "release"
    app = Recorder.options(max_ongoing_requests=1).bind(str(log), str(release))
    handle = serve.run(app)

    first = handle.block.remote("first")
    wait_for(lambda: "start:first" in events(log), message="the first call to start")
    # The only slot is taken: this one waits in the caller's router.
    queued = handle.quick.remote("queued")
    assert not queued.cancelled()
    queued.cancel()
    assert queued.cancelled()
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=10)
    queued.cancel()  # idempotent
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=10)

    release.touch()
    assert first.result(timeout_s=10) == "first"
    assert not first.cancelled()
    # FIFO: had the cancelled call stayed queued, it would have run before this one.
    assert handle.quick.remote("after").result(timeout_s=10) == "after"
    assert events(log) == ["start:first", "done:first", "quick:after"]


def test_cancel_while_running_cancels_on_the_replica(tmp_path: Path) -> None:
    log = tmp_path / "log"
    handle = serve.run(Recorder.bind(str(log), str(tmp_path / "never")))

    response = handle.wait_forever.remote("sync")
    wait_for(lambda: "start:sync" in events(log), message="the call to start")
    assert not response.cancelled()
    response.cancel()
    assert response.cancelled()
    wait_for(lambda: "cancelled:sync" in events(log),
             message="the replica to see asyncio.CancelledError")
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)
    with pytest.raises(RequestCancelledError):
        response.result()  # every later access

    async def in_loop() -> None:
        running = handle.wait_forever.remote("async")
        await asyncio.to_thread(wait_for, lambda: "start:async" in events(log),
                                message="the async call to start")
        running.cancel()
        assert running.cancelled()
        with pytest.raises((RequestCancelledError, asyncio.CancelledError)):
            await running
        await asyncio.to_thread(wait_for, lambda: "cancelled:async" in events(log),
                                message="the replica to cancel the async call")

    asyncio.run(in_loop())
    # The replica is still healthy.
    assert handle.quick.remote("ok").result(timeout_s=10) == "ok"


async def test_cancelling_the_awaiting_task_cancels_the_request(tmp_path: Path) -> None:
    log = tmp_path / "log"
    handle = serve.run(Recorder.bind(str(log), str(tmp_path / "never")))

    async def caller() -> None:
        await handle.wait_forever.remote("task")

    task = asyncio.ensure_future(caller())
    await asyncio.to_thread(wait_for, lambda: "start:task" in events(log),
                            message="the call to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(wait_for, lambda: "cancelled:task" in events(log),
                            message="the replica to cancel the request")

    # Also with asyncio.wait_for timing out on the response.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(handle.wait_forever.remote("timeout"), timeout=0.5)
    await asyncio.to_thread(wait_for, lambda: "cancelled:timeout" in events(log),
                            message="the replica to cancel the timed-out request")


@serve.deployment
class Ingress:
    def __init__(self, downstream: DeploymentHandle, log: str) -> None:
        self.downstream = downstream
        self.log = log

    async def __call__(self) -> None:
        # Started, never awaited:
        self.pending = self.downstream.wait_forever.remote("pending")
        record(self.log, "ingress:started")
        try:
            await self.downstream.wait_forever.remote("awaited")
        except asyncio.CancelledError:
            record(self.log, "cancelled:ingress")
            raise

    def sync_call(self) -> None:
        # A sync method that starts a downstream call and blocks on it.
        self.downstream.wait_forever.remote("from-sync").result()


def test_cancelling_ingress_cancels_downstream_requests(tmp_path: Path) -> None:
    log = tmp_path / "log"
    downstream = Recorder.bind(str(log), str(tmp_path / "never"))
    handle = serve.run(Ingress.bind(downstream, str(log)))

    response = handle.remote()
    wait_for(lambda: {"start:pending", "start:awaited"} <= set(events(log)),
             message="both downstream calls to start")
    response.cancel()
    wait_for(lambda: {"cancelled:ingress", "cancelled:awaited", "cancelled:pending"}
             <= set(events(log)), message="the ingress and both downstream calls to be cancelled")
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)

    sync_response = handle.sync_call.remote()
    wait_for(lambda: "start:from-sync" in events(log), message="the sync method's call")
    sync_response.cancel()
    wait_for(lambda: "cancelled:from-sync" in events(log),
             message="the sync method's downstream call to be cancelled")
    with pytest.raises(RequestCancelledError):
        sync_response.result(timeout_s=10)
