"""Fuzz fixtures: one instance per module (hypothesis runs many inputs against it), a leak
check at module teardown instead of after every test, and a count of the inputs tried."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import _children, shutdown_and_check_no_leaks

# Inputs tried per kind in this session (printed in pytest's summary).
INPUTS: Counter[str] = Counter()

# Fast enough for the default run; raise max_examples for a longer hunt.  No shrinking:
# a failing input here can take seconds (a bound running out), and pytest-timeout can't
# stop hypothesis's shrinker, so report the first failing input as generated.
FUZZ = settings(max_examples=100, deadline=None, database=None,
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Overrides the per-test check: the instance lives for the whole module, so shut it
    down and look for leaked children once, when the module is done."""
    before = {p.pid for p in _children()}
    yield
    shutdown_and_check_no_leaks(before, "fuzz module")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if INPUTS:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(INPUTS.items()))
        terminalreporter.write_line(f"fuzz inputs tried: {sum(INPUTS.values())} ({counts})")
