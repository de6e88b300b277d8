"""Run the benchmarks: ``python bench/run.py [--quick] [--only A,B] [--json PATH]``.

Each scenario runs in its own worker process (this script with ``--worker``)
that leads a new process group, so a scenario that hangs or leaks children is
killed as a whole at its deadline and the run goes on with an error row.
Baselines run before the scenarios that compare against them.  The table goes
to stdout; progress and scenario output go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import importlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from harness import (
    REGISTRY,
    Context,
    Result,
    Scenario,
    Skip,
    apply_baselines,
    apply_targets,
    descendant_pids,
    format_table,
    plan,
    to_result,
)

MODULES = ("ceilings", "scenarios_handles", "scenarios_http", "scenarios_payloads", "soak", "instance",
           "scenarios_ray")
BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
GRACE_S = 5.0  # past a scenario's own deadline, before its process group is killed


def load_modules() -> list[Result]:
    """Import the scenario modules; a module that fails to import becomes an error row."""
    failed = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:
            traceback.print_exc()
            for name in [n for n, sc in REGISTRY.items() if sc.fn.__module__ == module]:
                del REGISTRY[name]  # registered before the failure; the module is broken
            failed.append(Result(f"<import {module}>", "", "lower", error=f"{type(exc).__name__}: {exc}"))
    return failed


def machine() -> dict[str, str | int | None]:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        cpu = platform.processor()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
    }


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The worker leads its own group (start_new_session), so this reaches the
    # worker and anything it started, and nothing else.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_one(sc: Scenario, *, quick: bool) -> Result:
    # The worker's files live in this dir, so they go even if it is killed.
    # Unix socket paths must fit in 108 bytes, hence /tmp if TMPDIR is long.
    short = len(tempfile.gettempdir()) > 40
    with tempfile.TemporaryDirectory(prefix="ladle-bench-", dir="/tmp" if short else None) as tmp:
        result_path = Path(tmp, "result.json")
        target = f"{sc.fn.__module__}:{sc.name}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", target, "--result", str(result_path)]
        pythonpath = os.pathsep.join(p for p in (str(SRC_DIR), os.environ.get("PYTHONPATH", "")) if p)
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [*cmd, "--quick"] if quick else cmd,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )
        error = None
        try:
            rc = proc.wait(timeout=sc.timeout_s + GRACE_S)
            if rc != 0 and not result_path.exists():
                error = f"worker exited with code {rc}"
        except subprocess.TimeoutExpired:
            error = f"deadline: killed after {sc.timeout_s + GRACE_S:.0f} s"
        finally:
            _kill_group(proc)
        elapsed_s = time.monotonic() - t0
        if error is None:
            reply = json.loads(result_path.read_text())
            error = reply.get("error")
        if error is None and reply.get("skipped") is not None:
            return Result(sc.name, sc.unit, sc.better, baseline=sc.baseline, elapsed_s=elapsed_s, target=sc.target,
                          target_ratio=sc.target_ratio, versus=sc.versus, skipped=reply["skipped"])
        if error is not None:
            return Result(sc.name, sc.unit, sc.better, baseline=sc.baseline, error=error, elapsed_s=elapsed_s,
                          target=sc.target, target_ratio=sc.target_ratio)
        try:
            return to_result(sc, reply["figure"], elapsed_s)
        except (ValueError, TypeError) as exc:
            return Result(sc.name, sc.unit, sc.better, baseline=sc.baseline, error=str(exc), elapsed_s=elapsed_s,
                          target=sc.target, target_ratio=sc.target_ratio)


def _watch_parent() -> None:
    # If the harness dies, take this worker's whole process group with it.
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)


def worker(target: str, result_path: Path, *, quick: bool) -> int:
    threading.Thread(target=_watch_parent, name="watch-parent", daemon=True).start()
    module, _, name = target.partition(":")
    tmp_dir = result_path.parent / "s"
    tmp_dir.mkdir(mode=0o700)
    t0 = time.monotonic()
    try:
        importlib.import_module(module)
        sc = REGISTRY[name]
        figure = sc.fn(Context(quick=quick, deadline=t0 + sc.timeout_s, tmp_dir=tmp_dir))
        reply: dict[str, object] = {"figure": figure, "elapsed_s": time.monotonic() - t0}
    except Skip as exc:
        print(f"bench: {target} skipped: {exc}", file=sys.stderr)
        reply = {"skipped": str(exc)}
    except BaseException as exc:
        traceback.print_exc()
        reply = {"error": (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:200].rstrip(": ")}
    leaked = descendant_pids()
    if leaked:
        print(f"bench: {target} left processes {leaked} running; they are killed", file=sys.stderr)
    result_path.write_text(json.dumps(reply, default=float))
    return 0 if "error" not in reply else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short run (the ceilings take well under 30 s)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="scenarios to run, or patterns such as 'http_*' (their baselines run too)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON")
    parser.add_argument("--list", action="store_true", help="list scenarios and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(1, str(SRC_DIR))

    if args.worker:
        return worker(args.worker, args.result, quick=args.quick)

    failed_imports = load_modules()
    if args.list:
        for sc in REGISTRY.values():
            print(f"{sc.name:28} {sc.unit:8} better={sc.better:6} baseline={sc.baseline or '-'}"
                  f"{'' if sc.default else '  (only with --only)'}")
        return 0
    try:
        # A name may be a pattern: --only 'http_*' runs every HTTP scenario.
        names = None if not args.only else [
            name for pattern in args.only.split(",")
            for name in (fnmatch.filter(REGISTRY, pattern) or [pattern])]
        todo = plan(names)
    except (KeyError, ValueError) as exc:
        parser.error(str(exc.args[0]))

    info = machine()
    mode = "quick" if args.quick else "full"
    print(f"ladle bench ({mode}) {info['date']}: {info['cpus']} CPUs, {info['cpu']}, Python {info['python']}",
          file=sys.stderr)
    results: list[Result] = list(failed_imports)
    t0 = time.monotonic()
    for i, sc in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {sc.name} ...", file=sys.stderr, flush=True)
        res = run_one(sc, quick=args.quick)
        results.append(res)
        status = (f"ERROR {res.error}" if res.error else f"skipped: {res.skipped}" if res.skipped
                  else f"{res.value:.4g} {res.unit}")
        print(f"[{i}/{len(todo)}] {sc.name}: {status} ({res.elapsed_s:.1f} s)", file=sys.stderr, flush=True)
    apply_baselines(results)
    apply_targets(results)

    print(f"\nladle bench ({mode}), {info['date']}, {info['cpus']} CPUs ({info['cpu']}), "
          f"Python {info['python']}, total {time.monotonic() - t0:.1f} s")
    print(format_table(results))
    if args.json:
        doc = {"machine": info, "quick": args.quick, "results": [dataclasses.asdict(r) for r in results]}
        args.json.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
