"""JSON that is always valid and always whole: NaN/inf become ``null``, files are replaced
atomically. The one NaN cleaner of the package (metrics, API responses, sidecars)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """A copy that ``json.dumps`` writes as strict JSON: non-finite floats → ``None``, numpy
    scalars and arrays → Python values, tuples → lists, keys → strings."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place: readers
    and a crash see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented strict JSON (see :func:`json_safe`), written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=2) + "\n")
