"""The benchmark harness API: registering scenarios, timing, results, the table.

Scenario modules (``ceilings.py``, ``scenarios_handles.py``) import from here
and register functions with ``@scenario``.  How scenarios are run (one worker
process each, under a deadline) lives in ``run.py``; nothing here starts a
process.  A scenario returns a float, or a dict with ``p50`` and ``p99`` (or
``value``) plus extra figures shown beside it.  Ratios against a baseline
put 1.0 at the baseline, and bigger is always better.
"""

from __future__ import annotations

import asyncio
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias

Better: TypeAlias = Literal["lower", "higher"]
Figure: TypeAlias = float | Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Context:
    """What a scenario gets: run size, its deadline, and a private temp dir.

    ``deadline`` is on the ``time.monotonic()`` clock; the worker process is
    killed a little after it, so use ``remaining_s()`` for socket timeouts to
    fail with a traceback instead.  ``tmp_dir`` is mode 0700, short enough for
    Unix socket paths, and removed after the scenario.
    """

    quick: bool
    deadline: float
    tmp_dir: Path

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def remaining_s(self) -> float:
        return max(0.001, self.deadline - time.monotonic())


ScenarioFn: TypeAlias = Callable[[Context], Figure]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    unit: str
    fn: ScenarioFn
    baseline: str | None
    better: Better
    timeout_s: float
    target: float | None = None
    target_ratio: float | None = None
    default: bool = True  # part of a run without --only
    versus: bool = False  # another framework against ladle's counterpart (the baseline): ratio inverted


@dataclass(slots=True)
class Result:
    """One row of the table; ``value`` is the scalar figure or the p50.

    ``ratio`` is None when there is no baseline or it could not be used
    (``note`` says why); ``error`` is set instead of ``value`` on failure,
    ``skipped`` (why) when the scenario raised ``Skip``.
    ``met`` says whether the scenario's target was reached (None: no target,
    or it could not be judged).
    """

    name: str
    unit: str
    better: Better
    value: float | None = None
    p99: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    baseline: str | None = None
    ratio: float | None = None
    ratio_p99: float | None = None
    note: str | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    target: float | None = None
    target_ratio: float | None = None
    met: bool | None = None
    versus: bool = False
    skipped: str | None = None


class Skip(Exception):
    """Raised by a scenario that cannot run on this machine (an optional tool is missing).

    Its row says why instead of giving a figure; it is not an error.
    """


REGISTRY: dict[str, Scenario] = {}


def scenario(
    name: str,
    unit: str,
    *,
    baseline: str | None = None,
    better: Better = "lower",
    timeout_s: float = 60.0,
    target: float | None = None,
    target_ratio: float | None = None,
    default: bool = True,
    versus: bool = False,
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``fn(ctx) -> float | {"p50": .., "p99": .., ...}`` as a scenario.

    A dict may carry ``value`` instead of ``p50``/``p99``; other keys are extras.

    ``baseline`` names a scenario (usually a ceiling) run first in the same
    run; the table shows this scenario's figure as a ratio of it.

    ``target`` is an absolute goal for the figure (the p50 or value): met when
    it is below the target for ``better="lower"``, at or above it for
    ``"higher"``.  ``target_ratio`` is a goal for the ratio to the baseline
    (bigger is better, e.g. 0.4 for "at least 40 % of the ceiling").

    ``default=False`` leaves the scenario out of a run without ``--only``
    (a long one, such as the soak).

    ``versus=True`` marks another framework measured against ladle's
    counterpart, named as its ``baseline``: the ratio is then inverted, so it
    reads "the baseline (ladle) is N times better" (bigger still favours ladle).
    """
    if better not in ("lower", "higher"):
        raise ValueError(f"scenario {name!r}: better must be 'lower' or 'higher', not {better!r}")
    if baseline == name:
        raise ValueError(f"scenario {name!r} cannot be its own baseline")
    if timeout_s <= 0:
        raise ValueError(f"scenario {name!r}: timeout_s must be positive, not {timeout_s!r}")
    if target_ratio is not None and baseline is None:
        raise ValueError(f"scenario {name!r}: target_ratio needs a baseline")
    if versus and (baseline is None or target is not None or target_ratio is not None):
        raise ValueError(f"scenario {name!r}: versus needs a baseline and takes no target")

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in REGISTRY:
            raise ValueError(f"scenario {name!r} is registered twice")
        REGISTRY[name] = Scenario(name, unit, fn, baseline, better, timeout_s, target, target_ratio, default,
                                  versus)
        return fn

    return register


def plan(names: Iterable[str] | None = None) -> list[Scenario]:
    """Scenarios to run, each preceded by its baselines; registration order otherwise.

    ``names=None`` means every scenario registered with ``default=True``.
    """
    wanted = [n for n, sc in REGISTRY.items() if sc.default] if names is None else list(names)
    unknown = [n for n in wanted if n not in REGISTRY]
    if unknown:
        raise KeyError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    order: list[Scenario] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"baseline cycle: {' -> '.join((*chain, name))}")
        sc = REGISTRY[name]
        if sc.baseline is not None and sc.baseline in REGISTRY:
            add(sc.baseline, (*chain, name))
        if sc not in order:
            order.append(sc)

    for name in sorted(wanted, key=list(REGISTRY).index):
        add(name, ())
    return order


def to_result(sc: Scenario, figure: Figure, elapsed_s: float) -> Result:
    res = Result(sc.name, sc.unit, sc.better, baseline=sc.baseline, elapsed_s=elapsed_s,
                 target=sc.target, target_ratio=sc.target_ratio, versus=sc.versus)
    if isinstance(figure, Mapping):
        extra = {k: float(v) for k, v in figure.items()}
        key = "p50" if "p50" in extra else "value"
        if key not in extra:
            raise ValueError(f"scenario {sc.name!r} returned a dict without 'p50' or 'value': {sorted(extra)}")
        res.value = extra.pop(key)
        res.p99 = extra.pop("p99", None)
        res.extra = extra
    else:
        res.value = float(figure)
    return res


def apply_baselines(results: list[Result]) -> None:
    """Fill ``ratio``: figure relative to the baseline's, oriented so bigger is better.

    For ``versus`` rows it is the baseline relative to the figure instead.
    """
    by_name = {r.name: r for r in results}

    def ratio(mine: float | None, theirs: float | None, better: Better) -> float | None:
        if mine is None or theirs is None or mine <= 0 or theirs <= 0:
            return None
        return theirs / mine if better == "lower" else mine / theirs

    for r in results:
        if r.baseline is None or r.error is not None or r.skipped is not None:
            continue
        base = by_name.get(r.baseline)
        if base is None or base.error is not None or base.skipped is not None:
            r.note = "baseline not run" if base is None else "baseline failed" if base.error else "baseline skipped"
            continue
        if base.unit != r.unit:
            r.note = f"unit {r.unit} vs {base.unit}"
            continue
        r.ratio = ratio(r.value, base.value, r.better)
        r.ratio_p99 = ratio(r.p99, base.p99, r.better)
        if r.versus:
            r.ratio = None if r.ratio is None else 1.0 / r.ratio
            r.ratio_p99 = None if r.ratio_p99 is None else 1.0 / r.ratio_p99


def to_target(r: Result) -> float | None:
    """The figure relative to its absolute target, oriented so >= 1.0 means met."""
    if r.target is None or r.value is None or r.value <= 0 or r.target <= 0:
        return None
    return r.target / r.value if r.better == "lower" else r.value / r.target


def apply_targets(results: list[Result]) -> None:
    """Fill ``met`` from ``target`` and ``target_ratio``; call after ``apply_baselines``."""
    for r in results:
        if r.error is not None or r.skipped is not None or (r.target is None and r.target_ratio is None):
            continue
        verdicts = []
        if r.target is not None and r.value is not None:
            verdicts.append(r.value < r.target if r.better == "lower" else r.value >= r.target)
        if r.target_ratio is not None and r.ratio is not None:
            verdicts.append(r.ratio >= r.target_ratio)
        wanted = (r.target is not None) + (r.target_ratio is not None)
        r.met = all(verdicts) if len(verdicts) == wanted else None


def _met_text(r: Result) -> str:
    if r.target is None and r.target_ratio is None:
        return ""
    if r.error is not None:
        return "NO"
    if r.skipped is not None:
        return "n/a"
    return {None: "n/a", True: "yes", False: "NO"}[r.met]


def _target_text(r: Result) -> str:
    parts = []
    if r.target is not None:
        parts.append(f"{'<' if r.better == 'lower' else '>='}{_fmt(r.target)}")
        x = to_target(r)
        if x is not None:
            parts[-1] += f" ({x:.2f}x)"
    if r.target_ratio is not None:
        parts.append(f">={r.target_ratio:.2f}x base")
    return ", ".join(parts)


def _fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    if x == int(x) and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


def format_table(results: list[Result]) -> str:
    """The report: figure, p99, unit, baseline, ratio, target and whether it was met.

    A ``versus`` row's ratio reads ``base N.NNx``: the baseline did N times better.
    """
    head = ("scenario", "figure", "p99", "unit", "better", "baseline", "ratio", "target", "met", "time_s", "extra")
    rows: list[tuple[str, ...]] = []
    for r in results:
        if r.error is not None:
            rows.append((r.name, "ERROR", "", r.unit, r.better, r.baseline or "", "", _target_text(r),
                         _met_text(r), f"{r.elapsed_s:.1f}", r.error))
            continue
        if r.skipped is not None:
            rows.append((r.name, "skipped", "", r.unit, r.better, r.baseline or "", "", _target_text(r),
                         _met_text(r), f"{r.elapsed_s:.1f}", r.skipped))
            continue
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        if r.ratio_p99 is not None:
            ratio += f" (p99 {r.ratio_p99:.2f}x)"
        if r.versus and r.ratio is not None:
            ratio = f"base {ratio}"  # the baseline (ladle) is N times better
        if r.baseline and r.ratio is None:
            ratio = f"n/a ({r.note})" if r.note else "n/a"
        rows.append(
            (r.name, _fmt(r.value), _fmt(r.p99) if r.p99 is not None else "", r.unit, r.better,
             r.baseline or "", ratio, _target_text(r), _met_text(r), f"{r.elapsed_s:.1f}",
             " ".join(f"{k}={_fmt(v)}" for k, v in r.extra.items()))
        )
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head) - 1)]
    lines = []
    for row in (head, *rows):
        cells = [c.rjust(w) if i in (1, 2) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join((*cells, row[-1])).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0..100) of samples, linearly interpolated."""
    if not samples:
        raise ValueError("percentile of no samples")
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Stopwatch:
    """Per-iteration timer: ``start()``/``stop()`` around each round trip.

    Costs two ``perf_counter_ns`` calls (~0.1 µs) per sample; ``summary_us()``
    gives ``{"p50", "p99", "mean", "n"}`` in microseconds, ready to return.
    """

    __slots__ = ("samples_ns", "_t0")

    def __init__(self) -> None:
        self.samples_ns: list[int] = []
        self._t0 = 0

    def start(self) -> None:
        self._t0 = time.perf_counter_ns()

    def stop(self) -> None:
        self.samples_ns.append(time.perf_counter_ns() - self._t0)

    def clear(self) -> None:
        self.samples_ns.clear()

    def summary_us(self) -> dict[str, float]:
        us = [s / 1000.0 for s in self.samples_ns]
        return {"p50": percentile(us, 50), "p99": percentile(us, 99), "mean": sum(us) / len(us), "n": len(us)}


def closed_loop_timing(ctx: Context) -> dict[str, float]:
    """``closed_loop`` keywords shared by every throughput scenario, so they compare.

    1 s of warm-up then three 1 s windows (0.3 s each with ``--quick``).
    """
    step = 0.3 if ctx.quick else 1.0
    return {"warmup_s": step, "window_s": step, "windows": 3, "timeout_s": max(1.0, ctx.remaining_s() - 5.0)}


async def closed_loop(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    warmup_s: float,
    window_s: float,
    windows: float,
    timeout_s: float,
) -> dict[str, float]:
    """Requests per second with ``concurrency`` callers each awaiting ``call()`` in a loop.

    Keeps exactly ``concurrency`` calls in flight (a caller starts its next
    call when the last one returns), lets ``warmup_s`` pass, then counts the
    calls completed in each of ``windows`` consecutive windows of ``window_s``
    and returns their median rate as ``value`` with ``best`` and ``worst``.
    Every caller then finishes its call in flight; a failing call, or no
    progress before ``timeout_s``, raises.  Run it inside the event loop the
    calls belong to.
    """
    done = 0
    stop = False

    async def caller() -> None:
        nonlocal done
        while not stop:
            await call()
            done += 1

    deadline = time.monotonic() + timeout_s
    tasks = [asyncio.ensure_future(caller()) for _ in range(concurrency)]

    async def pause(seconds: float) -> None:
        finished, _ = await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            task.result()  # a caller only ends early by raising
        if time.monotonic() > deadline:
            raise TimeoutError(f"closed loop ran past its {timeout_s:.0f} s deadline")

    try:
        await pause(warmup_s)
        rates = []
        for _ in range(int(windows)):
            count, t0 = done, time.perf_counter()
            await pause(window_s)
            rates.append((done - count) / (time.perf_counter() - t0))
        if not any(rates):
            raise RuntimeError("closed loop: no call completed in the measured windows")
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), max(0.001, deadline - time.monotonic()))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"value": statistics.median(rates), "best": max(rates), "worst": min(rates)}


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of resident set sizes (VmRSS) of pids; pids that are gone count 0."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    """Sum of proportional set sizes (shared pages split between sharers); gone pids count 0."""
    total = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        for line in rollup.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def last_cpu(pid: int, tid: int | None = None) -> int:
    """The CPU a process (or one of its threads) last ran on, from /proc."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    return int(Path(path).read_text().rsplit(")", 1)[1].split()[36])


def descendant_pids(root: int | None = None) -> list[int]:
    """Pids of all live descendants of root (default: this process), from /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
