"""``python -m harness`` is the same as the ``harness`` console script."""

from __future__ import annotations

import sys

from harness.cli import main

sys.exit(main())
