"""PneumoScope: pneumonia detection on chest X-rays with transfer-learned image models."""

from __future__ import annotations

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""Class order used everywhere: index 0 is NORMAL, index 1 (the positive class) is PNEUMONIA."""
