"""Starlette's request and response modules, loaded with ``ladle.serve``.

``from ray import serve`` imports ``starlette.requests`` and
``starlette.responses``, and Ray Serve's own docs rely on it: they write
``import starlette`` and then annotate ``request: starlette.requests.Request``
in a class body, which Python evaluates while defining the class. Importing
both here keeps that code working after the import rewrite. Starlette is a
required dependency, so this loads nothing optional.
"""

from __future__ import annotations

import starlette.requests
import starlette.responses

__all__: list[str] = []
