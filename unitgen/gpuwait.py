"""Compatibility: units rendered by unitgen 0.1.0 run ``python -m unitgen.gpuwait``.

Kept so that installed GPU instances keep starting after an upgrade, until they
are redeployed (new units run ``unitgen.inunit.gpuwait``).
"""

from __future__ import annotations

import sys

from unitgen.inunit.gpuwait import main

if __name__ == "__main__":
    sys.exit(main())
