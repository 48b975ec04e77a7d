"""Choosing the operating threshold of a classifier from labelled (validation) predictions.

Candidates are the distinct predicted probabilities, and the chosen value is returned as is, so
``y_prob >= threshold`` reproduces exactly the operating point that was selected.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from pneumoscope.evaluation.metrics import DegenerateInputWarning, _validate_inputs

THRESHOLD_METHODS: tuple[str, ...] = ("youden", "target_sensitivity")

DEFAULT_THRESHOLD: float = 0.5
"""Returned when a threshold cannot be chosen (one class only)."""

THRESHOLD_DESCRIPTIONS: dict[str, str] = {
    "youden": "Youden's J (sensitivity + specificity − 1) maximised on the validation split",
    "target_sensitivity": "the highest threshold reaching the target sensitivity on the validation split",
    "default-0.5": "the default 0.5 (no validation-based choice)",
}


@dataclass(frozen=True)
class ThresholdRule:
    """How a run's operating threshold was chosen (a typed value, not a string to parse)."""

    method: str = "youden"
    target_sensitivity: float | None = None
    pooled_with_stress: bool = False
    """Chosen on validation pooled with its stress-tested copies (``eval.threshold_on``)."""
    at_site: bool = False
    """Chosen on a site's own labelled films (``pneumoscope calibrate``), not on validation."""
    oof_folds: int = 0
    """Chosen on the out-of-fold predictions of a k-fold cross-validation inside the training
    split (``pneumoscope threshold-oof``, k = this), not on validation; 0: not."""

    @property
    def label(self) -> str:
        """Short form kept in ``metrics.json`` and checkpoints: ``target_sensitivity=0.9@val+stress``,
        ``youden@oof5``."""
        text = self.method + (f"={self.target_sensitivity}" if self.target_sensitivity else "")
        if self.oof_folds:
            return text + f"@oof{self.oof_folds}" + ("+stress" if self.pooled_with_stress else "")
        return text + ("@val+stress" if self.pooled_with_stress else "@site" if self.at_site else "")

    def describe(self) -> str:
        """One sentence for reports and model cards."""
        text = THRESHOLD_DESCRIPTIONS.get(self.method, self.method)
        if self.method == "target_sensitivity" and self.target_sensitivity:
            text += f" (target {self.target_sensitivity:g})"
        val = "on the validation split"
        where = "on the site's own labelled films (pneumoscope calibrate)" if self.at_site else \
            (f"on the out-of-fold predictions of a {self.oof_folds}-fold cross-validation inside the "
             "training split") if self.oof_folds else val
        if self.pooled_with_stress and not self.at_site:
            where += (" pooled with their" if self.oof_folds else " pooled with its") + \
                " stress-tested copies (changed exposure, blur, noise, compression)"
        return text.replace(val, where)

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method, "target_sensitivity": self.target_sensitivity,
               "pooled_with_stress": self.pooled_with_stress, "at_site": self.at_site}
        return {**out, "oof_folds": self.oof_folds} if self.oof_folds else out

    @classmethod
    def from_label(cls, text: str) -> ThresholdRule:
        """Read the short form (files written before the rule was stored as a mapping)."""
        method, _, pool = (text or "youden").partition("@")
        method, _, target = method.partition("=")
        folds = pool.removesuffix("+stress").removeprefix("oof") if pool.startswith("oof") else ""
        return cls(method, float(target) if target else None, pool.endswith("+stress"), pool == "site",
                   int(folds) if folds.isdigit() else 0)


def choose_threshold(
    y_true: ArrayLike,
    y_prob: ArrayLike,
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> float:
    """Pick a threshold so that ``y_prob >= threshold`` is the positive (pneumonia) call.

    ``"youden"`` maximises sensitivity + specificity - 1, ties going to the higher (more
    specific) threshold. ``"target_sensitivity"`` is the highest threshold whose sensitivity is
    at least ``target_sensitivity``, hence the best specificity at that sensitivity. With one
    class only, warns and returns 0.5.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(
            f"unknown threshold method {method!r}; expected one of {THRESHOLD_METHODS}"
        )
    if method == "target_sensitivity":
        if target_sensitivity is None:
            raise ValueError("method 'target_sensitivity' needs target_sensitivity in (0, 1]")
        if not 0.0 < float(target_sensitivity) <= 1.0:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity!r}")
    elif target_sensitivity is not None:
        warnings.warn(
            f"target_sensitivity={target_sensitivity!r} is ignored by method {method!r}",
            UserWarning,
            stacklevel=2,
        )
    y, p = _validate_inputs(y_true, y_prob)
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"only one class present: cannot choose a threshold, using {DEFAULT_THRESHOLD}",
            DegenerateInputWarning,
            stacklevel=2,
        )
        return DEFAULT_THRESHOLD

    # Walk the distinct scores from the top; at each, counts of cases with y_prob >= score.
    order = np.argsort(-p, kind="mergesort")
    ps = p[order]
    ys = y[order].astype(np.int64)
    last_of_run = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True])
    tps = np.cumsum(ys)[last_of_run]
    fps = (last_of_run + 1) - tps
    candidates = ps[last_of_run]  # descending

    if method == "youden":
        # J * n_pos * n_neg in integers, so equal J values compare equal exactly; argmax takes
        # the first, i.e. the highest threshold.
        scaled_j = tps * n_neg - fps * n_pos
        return float(candidates[int(np.argmax(scaled_j))])

    # Sensitivity only grows as the threshold falls: the first candidate reaching the target.
    needed = math.ceil(float(target_sensitivity) * n_pos - 1e-9)
    return float(candidates[int(np.argmax(tps >= needed))])
