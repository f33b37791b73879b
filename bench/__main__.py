"""``python -m bench`` runs every benchmark row; see bench/README.md."""

from __future__ import annotations

import sys

from bench.suite import main

sys.exit(main())
