from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.cli import main
from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.export import onnx as export
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.serve.predict import Predictor

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = build_model("resnet18", "none", image_size=48).eval()
    # A larger head than the 0.01 init, so probabilities spread and parity means something.
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.42,
                          threshold_method="youden")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors", model, info)


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(6):
        paths.append(root / f"img{i}.png")
        Image.fromarray(make_phantom(rng, 72, pneumonia=i % 2 == 1)).save(paths[-1])
    return paths


def test_export_writes_metadata_and_passes_parity(ckpt: Path, exported: Path) -> None:
    sidecar = json.loads(Path(f"{exported}.json").read_text())
    assert sidecar["parity"]["max_abs_diff"] < 1e-4
    embedded = export.read_onnx_metadata(exported)
    assert embedded["model"] == "resnet18" and embedded["threshold"] == pytest.approx(0.42)
    assert embedded["class_names"] == ["NORMAL", "PNEUMONIA"] and embedded["version"]
    assert embedded["preprocessing"]["image_size"] == 48
    assert {k: sidecar[k] for k in embedded} == embedded
    info = export.info_from_metadata(embedded)
    assert info.threshold == pytest.approx(0.42) and info.preprocessing.image_size == 48


def test_dynamic_batch_and_probabilities_match_torch(ckpt: Path, exported: Path) -> None:
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ckpt)
    session = export.ort_session(exported)
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["prob_pneumonia"]
    rng = np.random.default_rng(4)
    batch = np.stack([make_phantom(rng, 48, pneumonia=i % 2 == 0) for i in range(5)])
    for n in (1, 5):
        got = session.run(["prob_pneumonia"], {"image": to_model_input(batch[:n]).numpy()})[0]
        assert got.shape == (n,) and got.dtype == np.float32
        ref = predict_proba(model, batch[:n])
        assert np.abs(got - ref).max() < 1e-4


def test_onnx_backend_predicts_like_torch(ckpt: Path, exported: Path, images: list[Path],
                                         tmp_path: Path) -> None:
    torch_rows = Predictor(ckpt).predict_files(images, progress=False)
    onnx_rows = Predictor(exported).predict_files(images, batch_size=4, progress=False)
    p_torch = np.array([r.prob_pneumonia for r in torch_rows])
    p_onnx = np.array([r.prob_pneumonia for r in onnx_rows])
    assert np.abs(p_torch - p_onnx).max() < 1e-4 and np.ptp(p_torch) > 1e-3
    assert [r.label for r in onnx_rows] == [r.label for r in torch_rows]
    assert all(r.threshold == pytest.approx(0.42) for r in onnx_rows)

    # Through the CLI: --backend onnx on the checkpoint itself (exported in memory).
    out = tmp_path / "onnx.json"
    assert main(["predict", str(ckpt), *map(str, images), "--backend", "onnx", "--out", str(out)]) == 0
    p_cli = np.array([r["prob_pneumonia"] for r in json.loads(out.read_text())])
    assert np.abs(p_cli - p_torch).max() < 1e-4
    with pytest.raises(ValueError, match="onnx backend"):
        Predictor(exported, backend="torch")


def test_onnx_predictor_is_thread_safe(exported: Path) -> None:
    predictor = Predictor(exported)
    rng = np.random.default_rng(5)
    imgs = [make_phantom(rng, 48) for _ in range(6)]
    expected = predictor.predict_images(imgs, batch_size=2)
    outs: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        out = predictor.predict_images(imgs, batch_size=2)
        with lock:
            outs.append(out)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outs) == 4
    for out in outs:
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_cli_export_prints_the_difference_and_fails_on_mismatch(
        ckpt: Path, exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # Reuse the fixture's export (the tracing is the slow part); the parity check runs for real.
    monkeypatch.setattr(export, "export_bytes", lambda *a, **k: exported.read_bytes())
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "ok.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "max |difference| = " in printed and "ok.onnx" in printed
    monkeypatch.setattr(export, "check_parity", lambda model, session, n=4: 0.25)
    out = tmp_path / "bad.onnx"
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "disagree by 0.25" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "m.txt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err


def test_not_an_onnx_file(tmp_path: Path) -> None:
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"x\.onnx"):
        Predictor(tmp_path / "x.onnx")
