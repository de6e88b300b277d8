"""File signals between a test and its replicas: a replica notes what happened in a file
the test reads (``tests.conftest.lines``), and waits for a file the test creates."""

from __future__ import annotations

import asyncio
import os
import time


def note(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


async def released(path: str, timeout_s: float = 30.0) -> bool:
    """Wait (in a replica's loop) until ``path`` exists; False at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
