"""A long-lived instance (issue 11): how long ``ladle start`` and ``ladle deploy`` take.

``instance_start``: from running ``ladle start`` to the command returning, the
instance serving (controller, HTTP proxy and REST API up).  ``instance_deploy``:
from running ``ladle deploy`` of a config with one application of two
deployments (an ingress calling a downstream one) to the first HTTP 200 from
it.  Both from a fresh process each time, as a user types them; each run has
its own run directory and free ports, and shuts its instance down.  Targets:
under 1 s each (Ray Serve measured 6.6 s from a fresh process to the first
answer on this machine).
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness import Context, scenario

MODEL = textwrap.dedent('''
    from ladle import serve

    @serve.deployment
    class Downstream:
        def __call__(self, x: int) -> int:
            return x + 1

    @serve.deployment
    class Ingress:
        def __init__(self, downstream):
            self.downstream = downstream

        async def __call__(self, request=None):
            return {"value": await self.downstream.remote(1)}

    app = Ingress.bind(Downstream.bind())
''')

CONFIG = textwrap.dedent('''
    applications:
    - name: two
      route_prefix: /two
      import_path: bench_model:app
''')


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ladle(env: dict[str, str], cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "ladle", *args], env=env, cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


def _first_200(url: str, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} never answered 200")


def _runs(ctx: Context, measure_deploy: bool) -> dict[str, float]:
    (ctx.tmp_dir / "bench_model.py").write_text(MODEL)
    (ctx.tmp_dir / "config.yaml").write_text(CONFIG)
    times = []
    for i in range(ctx.scale(5, 2)):
        run_dir = ctx.tmp_dir / f"r{i}"
        env = dict(os.environ, LADLE_RUN_DIR=str(run_dir))
        port = _free_port()
        started = time.monotonic()
        _ladle(env, ctx.tmp_dir, "start", "--http-port", str(port), "--dashboard-port", "0")
        try:
            if measure_deploy:
                started = time.monotonic()
                _ladle(env, ctx.tmp_dir, "deploy", "config.yaml", "--no-wait")
                _first_200(f"http://127.0.0.1:{port}/two", time.monotonic() + 60)
            times.append(time.monotonic() - started)
        finally:
            _ladle(env, ctx.tmp_dir, "shutdown")
    print(f"runs: {', '.join(f'{t:.3f}' for t in times)} s", file=sys.stderr)
    return {"p50": statistics.median(times), "p99": max(times)}


@scenario("instance_start", "s", better="lower", target=1.0, timeout_s=120.0)
def instance_start(ctx: Context) -> dict[str, float]:
    """`ladle start` until it returns with the instance serving."""
    return _runs(ctx, measure_deploy=False)


@scenario("instance_deploy", "s", better="lower", target=1.0, timeout_s=180.0)
def instance_deploy(ctx: Context) -> dict[str, float]:
    """`ladle deploy` of a two-deployment config until its first HTTP 200."""
    return _runs(ctx, measure_deploy=True)
