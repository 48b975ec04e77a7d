"""What a PneumoScope model is for and what it cannot do: one text, shown by the web service's
model card and by every report."""

from __future__ import annotations

INTENDED_USE = (
    "Research and teaching: to study how transfer-learned image classifiers behave on chest "
    "X-rays (frontal, pediatric). Not for diagnosis, triage or any clinical decision.")

LIMITATIONS: tuple[str, ...] = (
    "Not for clinical use: research use only. Not a medical device; not cleared or approved for "
    "clinical use.",
    "Pediatric, single-centre data (Guangzhou Women and Children's Medical Center, patients aged "
    "1–5): a model trained on them is untested on adults, other hospitals, other scanners or other "
    "views. Re-validate on the target population (pneumoscope evaluate) before trusting any number.",
    "Possible shortcut learning: on a mixed-source staging of these data a model learned the "
    "preprocessing history instead of the lungs (validation AUC 0.998, test AUC 0.047). High "
    "validation scores alone do not show that the model looks at the lungs; check the Grad-CAM "
    "panels and evaluate on external data.",
    "Two classes only (NORMAL vs PNEUMONIA): other findings (effusion, tuberculosis, COVID-19, "
    "devices, tumours) are not recognised and may be labelled either way.",
    "Class prevalence shift: 74% pneumonia in training vs 62.5% in the test split, far above most "
    "clinical settings; predictive values (PPV/NPV) and the calibration depend on the prevalence "
    "where the model is used, and positive predictive values will be lower in practice.",
    "Labels are image-level diagnoses from the public release (no radiologist consensus "
    "re-reading, no lesion localisation); the bacteria/virus subtype comes from file names.",
    "Heatmaps show where the evidence for the pneumonia output lies, scaled per image; they are "
    "not a segmentation of lesions and are not comparable between images.",
)
