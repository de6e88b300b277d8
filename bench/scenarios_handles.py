"""Ladle scenarios: the public API measured against the ceilings in ``ceilings.py``.

No scenarios yet.  Register each one here with ``@scenario``, naming the
ceiling it is compared against; ``python bench/run.py`` runs that ceiling
first, in the same run, and prints the ratio.  For example::

    from harness import Context, Stopwatch, scenario

    @scenario("handle_sync_latency", "µs", baseline="pingpong_thread_uvloop", better="lower")
    def handle_sync_latency(ctx: Context) -> dict[str, float]:
        from ladle import serve  # import ladle inside: this module is imported by the harness too

        ...start an app with serve.run, warm up, then time ctx.scale(20_000, 3_000) calls
        with a Stopwatch, shut the app down in ``finally``...
        return watch.summary_us()

Throughput scenarios return a float with ``better="higher"`` (baseline
``pingpong_pipelined``); memory can be read with ``harness.rss_bytes`` over
``harness.descendant_pids()``.  Each scenario runs in its own process with a
deadline (``timeout_s``, default 60 s) and a private ``ctx.tmp_dir``.
"""

from __future__ import annotations
