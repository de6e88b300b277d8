"""The Ray side of ``scenarios_ray.py``: runs under Ray's interpreter, never ladle's.

``python ray_driver.py run NAME --result PATH --tmp DIR --seconds S [--quick]``
starts a private local Ray cluster (2 CPUs, no dashboard, quiet logs, its
files under DIR), runs the ladle scenario NAME on Ray Serve and writes its
figure as JSON to PATH.  The ladle scenario functions themselves run, so the
app code and the timing code are the very ones ladle is measured with:
``ladle`` is bound to ``ray.serve`` in ``sys.modules`` (ladle's API mirrors
Ray Serve's; ladle itself is not importable here).  ``... startup --tmp DIR``
is one fresh process for ``ray_startup``: import, start, first result, print.
Stopping whatever Ray leaves behind is the parent's job (``scenarios_ray.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
OBJECT_STORE_BYTES = 1024 * 1024 * 1024  # room for the 100 MiB payload scenarios' arguments


def bind_ladle_to_ray() -> None:
    """Make ``from ladle import serve`` and ``from ladle.handle import ...`` give Ray Serve's."""
    import ray.serve
    import ray.serve.handle

    ladle = types.ModuleType("ladle", "ray.serve standing in for ladle (bench/ray_driver.py)")
    ladle.serve = ray.serve  # type: ignore[attr-defined]
    ladle.handle = ray.serve.handle  # type: ignore[attr-defined]
    sys.modules["ladle"] = ladle
    sys.modules["ladle.handle"] = ray.serve.handle


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_ray(tmp_dir: Path, http_port: int) -> None:
    """A new local cluster whose files live under tmp_dir, and Serve with its proxy on 127.0.0.1."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, object_store_memory=OBJECT_STORE_BYTES, _temp_dir=str(tmp_dir / "ray"),
             _node_ip_address=HOST)
    serve.start(http_options={"host": HOST, "port": http_port}, logging_config={"log_level": "WARNING"})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def stop_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def ray_http(ctx: Any, http_port: int, connections: int) -> dict[str, float]:
    """``http_ladle_64``'s (or ``_1``'s) deployment behind Ray's proxy, the same wrk run."""
    from ray import serve

    from scenarios_http import _get_ok, _ladle_ok, latency, throughput

    serve.run(_ladle_ok(), name="http", route_prefix="/")
    url = f"http://{HOST}:{http_port}/"
    if not _get_ok(url, 5.0):
        raise RuntimeError(f"Ray's proxy did not answer 200 on {url}")
    return throughput(ctx, url) if connections == 64 else latency(ctx, url)


def run(name: str, result: Path, tmp_dir: Path, seconds: float, quick: bool) -> int:
    deadline = time.monotonic() + seconds
    try:
        bind_ladle_to_ray()
        import scenarios_handles
        import scenarios_payloads
        from harness import REGISTRY, Context

        scenarios = {
            "ray_sync_latency": scenarios_handles.handle_sync_latency,
            "ray_async_throughput": scenarios_handles.handle_async_throughput,
            "ray_composition_latency": scenarios_handles.composition_latency,
            "ray_stream_items": scenarios_handles.handle_stream_items,
            "ray_gather_default_loop": scenarios_payloads.handle_gather_default_loop,
            **{f"ray_payload_oneway_{size}": REGISTRY[f"payload_oneway_{size}"].fn
               for size in scenarios_payloads.SIZES},
        }
        http = {"ray_http_64": 64, "ray_http_1": 1}
        if name not in (*scenarios, *http):
            raise KeyError(f"no Ray scenario {name!r}")
        ctx = Context(quick=quick, deadline=deadline, tmp_dir=tmp_dir)
        port = free_port()
        t0 = time.perf_counter()
        start_ray(tmp_dir, port)
        started_s = time.perf_counter() - t0
        try:
            # The ladle function calls serve.run and, in its finally, serve.shutdown.
            figure: Any = ray_http(ctx, port, http[name]) if name in http else scenarios[name](ctx)
        finally:
            stop_ray()
        import ray

        reply: dict[str, Any] = {"figure": {**figure, "ray_start_s": started_s}, "ray_version": ray.__version__}
    except BaseException as exc:
        traceback.print_exc()
        reply = {"error": (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:200].rstrip(": ")}
    result.write_text(json.dumps(reply, default=float))
    return 0 if "error" not in reply else 1


def startup(tmp_dir: Path) -> int:
    """``startup_processes``' script on Ray: its Hello deployment, timed the same way, plus ray.init."""
    t0 = time.perf_counter()
    import ray
    from ray import serve

    t1 = time.perf_counter()

    @serve.deployment
    class Hello:
        def __call__(self, x: int) -> int:
            return x + 1

    try:
        start_ray(tmp_dir, free_port())
        t2 = time.perf_counter()
        handle = serve.run(Hello.bind(), name="startup")
        t3 = time.perf_counter()
        result = handle.remote(1).result()
        t4 = time.perf_counter()
        print(result, f"import_s={t1 - t0:.6f} init_s={t2 - t1:.6f} run_s={t3 - t2:.6f} first_call_s={t4 - t3:.6f}",
              flush=True)
    finally:
        stop_ray()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("run", "startup"))
    parser.add_argument("name", nargs="?")
    parser.add_argument("--result", type=Path)
    parser.add_argument("--tmp", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.mode == "startup":
        return startup(args.tmp)
    if args.name is None or args.result is None:
        parser.error("run needs NAME and --result")
    return run(args.name, args.result, args.tmp, args.seconds, args.quick)


if __name__ == "__main__":
    raise SystemExit(main())
