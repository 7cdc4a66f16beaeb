"""Strict-constraints rehearsal harness for the booking database.

One module per pipeline stage: target, provision, lint, migrate, validate,
load, report, nightly; ``cli`` parses flags and calls them.
"""

from __future__ import annotations

__version__ = "0.1.0"
