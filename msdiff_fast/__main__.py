"""``python -m msdiff_fast``: the ``msdiff`` command (see msdiff_fast/cli.py)."""

from .cli import main

raise SystemExit(main())
