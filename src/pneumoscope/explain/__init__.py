"""Explanations: class activation maps (pytorch-grad-cam), overlays and a faithfulness check.

Needs the ``explain`` extra (``pip install 'pneumoscope[explain]'``). Names are re-exported
lazily, so importing this package never fails; using them without the extra raises a
``ModuleNotFoundError`` that says what to install.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CAM_METHODS", "Explanation", "explain", "explain_files", "faithfulness", "overlay_png",
           "target_layer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pneumoscope.explain import cam

        return getattr(cam, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
