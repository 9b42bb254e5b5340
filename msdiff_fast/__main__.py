"""``python -m msdiff_fast``: the ``msdiff`` command (see msdiff_fast/cli/)."""

from .cli import main

raise SystemExit(main())
