"""The input gate: between decoding and the model, it says whether an image is a chest film.

``ok`` (like the training films), ``warn`` (unlike them: probability shown but unreliable) or
``refuse`` (not a frontal chest X-ray). Deterministic checks (:mod:`.checks`) refuse what is
certainly not a chest film; a learned score (:mod:`.ood`) measures how far an image lies from
the training films; :mod:`.gate` combines them and stores the state in the checkpoint.
"""

from pneumoscope.guard.checks import Tolerances, check_dicom, check_image
from pneumoscope.guard.gate import (
    GATE_PREFIX,
    Gate,
    GateLevels,
    Verdict,
    choose_levels,
    describe_reason,
    fit_gate,
    pop_gate_tensors,
)
from pneumoscope.guard.ood import FeatureSpec, OODScorer

__all__ = ["GATE_PREFIX", "FeatureSpec", "Gate", "GateLevels", "OODScorer", "Tolerances", "Verdict",
           "check_dicom", "check_image", "choose_levels", "describe_reason", "fit_gate",
           "pop_gate_tensors"]
