"""``python -m unitgen`` is the same as the ``unitgen`` command."""

from __future__ import annotations

from unitgen.cli import main

main()
