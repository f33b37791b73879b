"""Compatibility: units rendered by unitgen 0.1.0 run ``python -m unitgen.probe``.

Kept so that installed instances keep starting after an upgrade, until they are
redeployed (new units run ``unitgen.inunit.probe``). Import-light like the probe.
"""

from __future__ import annotations

import sys

from unitgen.inunit.probe import main

if __name__ == "__main__":
    sys.exit(main())
