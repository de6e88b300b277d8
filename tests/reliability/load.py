"""A bounded steady load for fault-injection tests: caller threads that record every outcome.

Each thread sends one request at a time (through a handle or over HTTP to
127.0.0.1), waits a bounded time for its answer, and records what came
back.  A call that gets no answer within ``CALL_TIMEOUT_S`` is recorded as
a hang, so a test can prove that every request was answered.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ladle.handle import DeploymentHandle

CALL_TIMEOUT_S = 10.0
HANG = "hang"


@dataclass(frozen=True)
class Outcome:
    path: str  # "handle" or "http"
    tag: str
    sent: float  # time.monotonic()
    done: float
    value: Any = None  # the answer, when ok
    error: str | None = None  # exception class name, "http 503", or HANG

    @property
    def ok(self) -> bool:
        return self.error is None


# A caller factory runs in its thread and returns (call, close): call(tag) -> value or raises.
CallerFactory = Callable[[], tuple[Callable[[str], Any], Callable[[], None]]]


def handle_caller(handle: DeploymentHandle) -> CallerFactory:
    def factory() -> tuple[Callable[[str], Any], Callable[[], None]]:
        def call(tag: str) -> Any:
            return handle.remote(tag).result(timeout_s=CALL_TIMEOUT_S)
        return call, lambda: None
    return factory


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def http_caller(url: str) -> CallerFactory:
    """GET ``url?tag=...``; a 200 answers its JSON body, anything else raises HTTPError."""
    def factory() -> tuple[Callable[[str], Any], Callable[[], None]]:
        client = httpx.Client(timeout=CALL_TIMEOUT_S)

        def call(tag: str) -> Any:
            response = client.get(url, params={"tag": tag})
            if response.status_code != 200:
                raise HTTPError(response.status_code)
            return response.json()
        return call, client.close
    return factory


class Load:
    """``threads`` caller threads per factory, running until ``stop()``."""

    def __init__(self, factories: dict[str, CallerFactory], threads: int) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._threads = [
            threading.Thread(target=self._run, args=(path, factory), daemon=True,
                             name=f"load-{path}-{i}")
            for path, factory in factories.items() for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self, path: str, factory: CallerFactory) -> None:
        call, close = factory()
        try:
            while not self._stop.is_set():
                tag = f"{path}-{next(self._counter)}"
                sent = time.monotonic()
                try:
                    value = call(tag)
                except TimeoutError:
                    self.outcomes.append(Outcome(path, tag, sent, time.monotonic(), error=HANG))
                except httpx.TimeoutException:
                    self.outcomes.append(Outcome(path, tag, sent, time.monotonic(), error=HANG))
                except HTTPError as exc:
                    self.outcomes.append(Outcome(path, tag, sent, time.monotonic(),
                                                 error=f"http {exc.status}"))
                except Exception as exc:
                    self.outcomes.append(Outcome(path, tag, sent, time.monotonic(),
                                                 error=type(exc).__name__))
                else:
                    self.outcomes.append(Outcome(path, tag, sent, time.monotonic(), value))
        finally:
            close()

    def successes_since(self, since: float, path: str | None = None) -> list[Outcome]:
        return [o for o in list(self.outcomes)
                if o.ok and o.sent >= since and (path is None or o.path == path)]

    def stop(self) -> list[Outcome]:
        """Stop the callers; every one finishes within its bounded wait."""
        self._stop.set()
        for thread in self._threads:
            thread.join(CALL_TIMEOUT_S + 5)
            assert not thread.is_alive(), f"{thread.name} did not finish"
        return list(self.outcomes)
