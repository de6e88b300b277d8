"""Fault-injection fixtures: an instance whose proxy listens on a free port of 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ladle import serve
from ladle._api.lifecycle import http_port


@pytest.fixture
def http_url() -> Iterator[str]:
    """Start ladle with its HTTP proxy on a free port; yield ``http://127.0.0.1:PORT``."""
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    port = http_port()
    assert port
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
