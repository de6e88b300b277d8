"""Where a controller keeps its desired state, so that a restarted one carries on.

A ``StateStore`` holds one small document (JSON-able: applications, their
targets, the replica records, the proxy's options) and content-addressed
blobs (the serialized code and constructor arguments, written once per
version).  ``FileStore`` keeps them in the instance's run directory; the
Ray backend will keep them in Ray's KV store behind the same interface.
``encode_app``/``decode_app`` turn the controller's targets into that
document and back.  Nothing here decides *what* is kept: see the Controller.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Protocol

from .._core.types import DeploymentID
from .autoscaling import AutoscalingPolicy
from .deployment_state import DeploymentTarget

STATE_VERSION = 1


class StateStore(Protocol):
    """Durable controller state: ``save`` replaces the document atomically (a reader
    sees the old one or the new one, never a mix); blobs are immutable once put."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, state: dict[str, Any]) -> None: ...

    def put_blob(self, data: bytes) -> str:
        """Store ``data``; return its key (its digest: putting it twice is free)."""
        ...

    def get_blob(self, key: str) -> bytes: ...

    def keep_blobs(self, keys: set[str]) -> None:
        """Forget every blob whose key is not in ``keys``."""
        ...


class FileStore:
    """``state.json`` and ``blobs/<sha256>`` in a private directory (files 0600).

    No fsync: the state must survive its controller's death, which the page
    cache does; a machine going down stops the applications anyway.
    """

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._blobs = directory / "blobs"
        self._known: set[str] = set()

    def load(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads((self._dir / "state.json").read_text())
        except FileNotFoundError:
            return None
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self._dir / 'state.json'} has version {state.get('version')!r}, "
                             f"this ladle reads version {STATE_VERSION}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        _write_atomic(self._dir / "state.json", json.dumps(state).encode())

    def put_blob(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        if key not in self._known:
            self._blobs.mkdir(mode=0o700, exist_ok=True)
            path = self._blobs / key
            if not path.exists():
                _write_atomic(path, data)
            self._known.add(key)
        return key

    def get_blob(self, key: str) -> bytes:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return (self._blobs / key).read_bytes()

    def keep_blobs(self, keys: set[str]) -> None:
        if not self._blobs.exists():
            return
        for path in self._blobs.iterdir():
            if path.name not in keys and not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._known.discard(path.name)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------ codec

_BYTES_FIELDS = ("serialized_callable", "serialized_init")


def encode_target(target: DeploymentTarget, store: StateStore) -> dict[str, Any]:
    """A DeploymentTarget as JSON-able data; its code and arguments go to blobs."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(target):
        value = getattr(target, f.name)
        if f.name in _BYTES_FIELDS:
            value = store.put_blob(value)
        elif f.name == "deployment_id":
            value = [value.name, value.app_name]
        elif f.name == "autoscaling" and value is not None:
            value = dataclasses.asdict(value)
        elif f.name == "extras":
            value = _encode_extras(value)
        data[f.name] = value
    return data


def decode_target(data: dict[str, Any], store: StateStore) -> DeploymentTarget:
    values = dict(data)
    for name in _BYTES_FIELDS:
        values[name] = store.get_blob(values[name])
    values["deployment_id"] = DeploymentID(*values["deployment_id"])
    if values.get("autoscaling") is not None:
        values["autoscaling"] = AutoscalingPolicy(**values["autoscaling"])
    values["extras"] = _decode_extras(values.get("extras", {}))
    return DeploymentTarget(**values)


def blob_keys(target_data: dict[str, Any]) -> set[str]:
    return {target_data[name] for name in _BYTES_FIELDS}


def _encode_extras(extras: dict[str, Any]) -> dict[str, Any]:
    # Extras are plain data except for bytes (base64, marked so they come back as bytes).
    return {key: {"__bytes__": base64.b64encode(value).decode()} if isinstance(value, bytes)
            else value for key, value in extras.items()}


def _decode_extras(extras: dict[str, Any]) -> dict[str, Any]:
    return {key: base64.b64decode(value["__bytes__"])
            if isinstance(value, dict) and set(value) == {"__bytes__"} else value
            for key, value in extras.items()}
