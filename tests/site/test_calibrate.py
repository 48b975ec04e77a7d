from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.data.cache import decode_images
from pneumoscope.data.records import scan_tree
from pneumoscope.data.synthetic import write_kermany_tree
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.threshold import choose_threshold
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint, read_info, save_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.site.calibrate import (
    SmallSiteWarning,
    calibrate_checkpoint,
    fit_calibration,
    fit_temperature,
)
from pneumoscope.site.common import fingerprint, predict_logits

SIZE = 32


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=SIZE).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)  # spread the logits
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.5,
                          threshold_method="youden")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", model, info)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A deeper layout than NORMAL/PNEUMONIA at the top: site/2024/{NORMAL,PNEUMONIA}.
    root = tmp_path_factory.mktemp("site") / "hospital"
    write_kermany_tree(root, {"2024": (12, 14)}, size=40, seed=3)
    return root


def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 20_000)
    y = (rng.random(z.shape) < 1.0 / (1.0 + np.exp(-z))).astype(int)
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.06)
    assert fit_temperature(3.0 * z, y) == pytest.approx(3.0, rel=0.05)  # overconfident logits
    assert fit_temperature(0.5 * z, y) == pytest.approx(0.5, rel=0.05)
    with pytest.warns(UserWarning, match="lower bound"):
        assert fit_temperature(z, (z > 0).astype(int)) == 0.05  # separable: T -> 0
    with pytest.warns(UserWarning, match="upper bound"):
        assert fit_temperature(np.zeros(10), np.r_[np.zeros(5), np.ones(5)]) == 20.0


def test_fit_calibration_keeps_the_temperature_unless_asked() -> None:
    z = np.array([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    y = np.array([0, 0, 1, 0, 1, 1])
    cal = fit_calibration(z, y, target_sensitivity=1.0, current_temperature=1.7)
    assert cal.temperature == 1.7 and cal.method == "target_sensitivity"
    assert cal.threshold == pytest.approx(1.0 / (1.0 + math.exp(-0.5 / 1.7)), rel=1e-6)
    assert cal.label == "target_sensitivity=1@site"
    assert fit_calibration(z, y).label == "youden@site"
    with pytest.warns(UserWarning, match="not identifiable"):  # separable: T kept
        assert fit_calibration(z, (z > 0).astype(int), temperature=True,
                               current_temperature=1.7).temperature == 1.7
    with pytest.raises(ValueError, match="both classes"):
        fit_calibration(z, np.ones(6, dtype=int))
    with pytest.raises(ValueError, match="unknown threshold method 'best'"):
        fit_calibration(z, y, method="best")


def test_calibrate_writes_a_new_checkpoint_at_the_target_sensitivity(ckpt: Path, site: Path,
                                                                     tmp_path: Path) -> None:
    before = _sha(ckpt)
    out = tmp_path / "site.safetensors"
    with pytest.warns(SmallSiteWarning, match=r"fewer than 50 per class.*half-width is ±"):
        result = calibrate_checkpoint(ckpt, site, out=out, target_sensitivity=0.9,
                                      n_resamples=200, command="pneumoscope calibrate test")
    assert _sha(ckpt) == before and out.is_file()
    assert read_info(ckpt).provenance == ()  # the input keeps its own metadata

    model, info = load_checkpoint(out)
    assert info.threshold == result.calibration.threshold
    assert info.threshold_method == "target_sensitivity=0.9@site"
    assert result.after["metrics"]["sensitivity"] >= 0.9
    (step,) = info.provenance
    assert step["step"] == "calibrate" and step["command"] == "pneumoscope calibrate test"
    assert step["date"] and step["source_checkpoint"]["sha256"] == before
    assert step["site_data"]["n_normal"] == 12 and step["site_data"]["n_pneumonia"] == 14
    records = scan_tree(site)
    assert step["site_data"]["fingerprint"] == fingerprint(site, [r.path for r in records])
    assert step["previous"] == {"threshold": 0.5, "threshold_method": "youden", "temperature": 1.0}
    assert step["site_metrics"]["in_sample"] is True and step["warnings"] == list(result.warnings)

    # The saved threshold reproduces through the ordinary prediction path: it is the highest
    # threshold reaching 90 % sensitivity on the site's films.
    decoded = decode_images(records, SIZE)
    probs = predict_proba(model, decoded.images)
    labels = decoded.labels
    assert (probs[labels == 1] >= info.threshold).mean() >= 0.9
    assert choose_threshold(labels, probs, "target_sensitivity", 0.9) == pytest.approx(info.threshold)


def test_calibrate_with_temperature_sets_it_on_the_saved_model(ckpt: Path, site: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    # A random model's logits say little about the labels: T goes to its upper bound.
    with pytest.warns(SmallSiteWarning), pytest.warns(UserWarning, match="upper bound"):
        result = calibrate_checkpoint(ckpt, site, out=out, method="youden", temperature=True,
                                      n_resamples=0)
    model, info = load_checkpoint(out)
    t = result.calibration.temperature
    assert info.temperature == t and 0.05 <= t <= 20.0 and t != 1.0
    decoded = decode_images(scan_tree(site), SIZE)
    raw = predict_logits(model, decoded.images)  # temperature 1
    np.testing.assert_allclose(predict_proba(model, decoded.images),
                               1.0 / (1.0 + np.exp(-raw.astype(np.float64) / t)), atol=1e-6)
    assert result.after["metrics"]["log_loss"] <= result.before["metrics"]["log_loss"] + 1e-9


def test_calibrate_refuses_bad_inputs(ckpt: Path, site: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is the input checkpoint"):
        calibrate_checkpoint(ckpt, site, out=ckpt)
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        calibrate_checkpoint(ckpt, site, out=existing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        calibrate_checkpoint(ckpt, tmp_path / "nowhere", out=tmp_path / "a.safetensors")
    one_class = tmp_path / "one"
    write_kermany_tree(one_class, {"x": (4, 0)}, size=24)
    with pytest.raises(ValueError, match="PNEUMONIA"):
        calibrate_checkpoint(ckpt, one_class, out=tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="target_sensitivity must be in"):
        calibrate_checkpoint(ckpt, site, out=tmp_path / "c.safetensors", target_sensitivity=1.5)
    assert not any(tmp_path.glob("[abc].safetensors"))


def test_a_file_chosen_with_tta_is_calibrated_with_tta(ckpt: Path, site: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from pneumoscope.evaluation.tta import TTA_VIEWS, view_names

    model, info = load_checkpoint(ckpt)
    tta_file = save_checkpoint(tmp_path / "tta.safetensors", model,
                               replace(info, tta=view_names(TTA_VIEWS), created=""))
    with pytest.warns(SmallSiteWarning):
        result = calibrate_checkpoint(tta_file, site, out=tmp_path / "site.safetensors", n_resamples=0)
    decoded = decode_images(scan_tree(site), SIZE)
    probs = predict_proba(model, decoded.images, tta=TTA_VIEWS)
    assert result.calibration.threshold == pytest.approx(choose_threshold(decoded.labels, probs), abs=1e-6)
    assert read_info(result.out).tta == view_names(TTA_VIEWS)  # predict and serve go on with TTA
