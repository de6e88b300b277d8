"""The ``current`` file: how ``ladle status`` and ``ladle shutdown`` find a running instance.

A local instance records its controller's control-socket address (and its
process id) in ``<run root>/current`` when it starts, and removes the file at
shutdown if it still names this instance; the newest instance wins.  What
the CLI says to the controller is not here (see ``_ControlServer``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

FILENAME = "current"


def record(root: Path, address: str) -> None:
    """Name the instance at ``address`` (of this process) as the current one under ``root``."""
    data = json.dumps({"address": address, "pid": os.getpid()})
    tmp = root / f".{FILENAME}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.replace(tmp, root / FILENAME)  # atomic: readers never see half a file


def read(root: Path) -> dict[str, Any] | None:
    """``{"address": ..., "pid": ...}`` of the current instance, or None if none was recorded."""
    try:
        data = json.loads((root / FILENAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("address"), str):
        return None
    return data


def forget(root: Path, address: str) -> None:
    """Remove the file if it still names the instance at ``address``."""
    current = read(root)
    if current is not None and current["address"] == address:
        with contextlib.suppress(FileNotFoundError):
            (root / FILENAME).unlink()
