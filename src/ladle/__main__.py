"""``python -m ladle``: the ``ladle`` command (see ``_cli.py``)."""

from ._cli import main

raise SystemExit(main())
