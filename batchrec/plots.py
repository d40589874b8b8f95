"""Matplotlib for the report's figures, drawn to files without a display (the Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot: cron and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt"]
