"""Autoscaling with real replicas: load above the target adds replicas, idleness removes them."""

from __future__ import annotations

from ladle import serve
from tests.conftest import wait_for


def _running(app: str, name: str) -> int:
    deployment = serve.status().applications[app].deployments[name]
    return deployment.replica_states.get("RUNNING", 0)


def test_load_scales_up_and_idleness_scales_down(tmp_path) -> None:
    release = tmp_path / "release"

    @serve.deployment(max_ongoing_requests=10, autoscaling_config={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
        "metrics_interval_s": 0.1, "upscale_delay_s": 0, "downscale_delay_s": 0.5},
        graceful_shutdown_wait_loop_s=0.1)
    class Busy:
        async def __call__(self) -> str:
            import asyncio
            import os
            while not os.path.exists(str(release)):
                await asyncio.sleep(0.01)  # the workload: held until the test releases it
            return "done"

    handle = serve.run(Busy.bind(), name="auto")
    assert _running("auto", "Busy") == 1
    responses = [handle.remote() for _ in range(4)]
    wait_for(lambda: _running("auto", "Busy") == 2, timeout_s=30,
             message="a second replica under load")
    release.touch()
    assert [r.result(timeout_s=30) for r in responses] == ["done"] * 4
    wait_for(lambda: _running("auto", "Busy") == 1 and
             serve.status().applications["auto"].deployments["Busy"].target_num_replicas == 1,
             timeout_s=30, message="back to one replica when idle")
    assert handle.remote().result(timeout_s=30) == "done"
