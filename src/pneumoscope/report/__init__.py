"""One self-contained HTML report (and a Markdown summary) per compare folder or run folder:
leaderboard, ROC/PR curves, confusion matrices, calibration, training curves, Grad-CAM panels,
faithfulness and model cards. Needs the ``report`` extra (matplotlib, jinja2); the Grad-CAM
panels also need the ``explain`` extra (grad-cam).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["build_report"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, **kwargs: Any) -> dict[str, Path]:
    """See :func:`pneumoscope.report.build.build_report` (imported on first use: matplotlib is
    optional and slow to import)."""
    from pneumoscope.report.build import build_report as _build

    return _build(run_dir, out_dir, **kwargs)
