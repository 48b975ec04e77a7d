"""Test-time augmentation: the views' geometry, the library function, evaluate and predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.data.synthetic import make_phantom
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.tta import IDENTITY, TTA_VIEWS, View, tta_logits
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import XrayClassifier, build_model


@pytest.fixture(scope="module")
def model() -> XrayClassifier:
    """A random resnet18 at 48 px, head scaled up so probabilities spread over (0, 1)."""
    torch.manual_seed(0)
    m = build_model("resnet18", "none", image_size=48).eval()
    torch.nn.init.normal_(m.backbone.get_classifier().weight, std=0.3)
    return m


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([make_phantom(rng, 48, pneumonia=i % 2 == 1) for i in range(6)])


def _spot() -> torch.Tensor:
    x = torch.zeros(1, 1, 65, 65)
    x[0, 0, 32, 60] = 1.0  # right of the centre (row 32, column 60)
    return x


def _peak(x: torch.Tensor) -> tuple[int, int]:
    row, col = divmod(int(x[0, 0].argmax()), x.shape[-1])
    return row, col


def test_the_fixed_set() -> None:
    assert [v.name for v in TTA_VIEWS] == ["identity", "scale+5%", "scale-5%", "rotate+3deg", "rotate-3deg"]
    assert TTA_VIEWS[0] is IDENTITY and IDENTITY.is_identity
    assert sorted(v.scale for v in TTA_VIEWS) == [0.95, 1.0, 1.0, 1.0, 1.05]
    assert sorted(v.degrees for v in TTA_VIEWS) == [-3.0, 0.0, 0.0, 0.0, 3.0]


def test_views_move_content_as_named() -> None:
    x = _spot()
    assert IDENTITY.apply(x) is x
    assert _peak(View("ccw", degrees=30).apply(x)) == (18, 56)  # turned up: counter-clockwise
    assert _peak(View("cw", degrees=-30).apply(x)) == (46, 56)
    assert _peak(View("in", scale=1.05).apply(x))[1] > 60 > _peak(View("out", scale=0.95).apply(x))[1]
    flat = torch.full((2, 1, 16, 16), 0.7)  # zooming out replicates the border, no black frame
    torch.testing.assert_close(View("out", scale=0.8).apply(flat), flat)


@pytest.mark.parametrize(("scale", "degrees"), [(0.0, 0.0), (float("nan"), 0.0), (1.0, 90.0)])
def test_bad_views_are_refused(scale: float, degrees: float) -> None:
    with pytest.raises(ValueError, match="view 'bad'"):
        View("bad", scale=scale, degrees=degrees)


def test_identity_only_equals_no_tta(model: XrayClassifier, images: np.ndarray) -> None:
    plain = predict_proba(model, images, batch_size=4)
    np.testing.assert_array_equal(predict_proba(model, images, batch_size=4, tta=(IDENTITY,)), plain)
    np.testing.assert_array_equal(predict_proba(model, images, batch_size=4, tta=()), plain)


def test_tta_is_finite_bounded_deterministic_and_averages_logits(model: XrayClassifier,
                                                                 images: np.ndarray) -> None:
    first = predict_proba(model, images, batch_size=4, tta=TTA_VIEWS)
    assert first.shape == (len(images),) and np.isfinite(first).all()
    assert ((first >= 0) & (first <= 1)).all()
    np.testing.assert_array_equal(predict_proba(model, images, batch_size=4, tta=TTA_VIEWS), first)
    np.testing.assert_array_equal(predict_proba(model, images, batch_size=6, tta=TTA_VIEWS), first)
    assert not np.allclose(first, predict_proba(model, images))  # the views do change the input
    # The mean of the views' logits, not of their probabilities.
    from pneumoscope.data.datasets import to_model_input

    x = to_model_input(images)
    with torch.no_grad():
        logits = torch.stack([model(v.apply(x)) for v in TTA_VIEWS]).mean(0)
        np.testing.assert_allclose(first, torch.sigmoid(logits).squeeze(1).numpy(), rtol=1e-5)
        with pytest.raises(ValueError, match="at least one view"):
            tta_logits(model, x, ())


def test_evaluate_and_predict_take_tta(model: XrayClassifier, kermany_tree: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscope.cli import main
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint
    from pneumoscope.serve.predict import Predictor

    ckpt = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4))
    plain = evaluate_checkpoint(ckpt, kermany_tree, tmp_path / "plain", n_bootstrap=0, gate=False)
    assert plain["tta"] is None
    assert main(["evaluate", str(ckpt), "--data", str(kermany_tree), "--out", str(tmp_path / "tta"),
                 "--n-bootstrap", "0", "--no-gate", "--tta"]) == 0
    report = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert report["tta"] == [v.name for v in TTA_VIEWS] and report["threshold"] == 0.4
    assert report["n"] == plain["n"]

    files = sorted((kermany_tree / "test").rglob("*.png"))[:4]
    with_tta = Predictor(ckpt, tta=True).predict_files(files, progress=False)
    without = Predictor(ckpt).predict_files(files, progress=False)
    assert all(0.0 <= r.prob_pneumonia <= 1.0 for r in with_tta)
    assert [r.prob_pneumonia for r in with_tta] != [r.prob_pneumonia for r in without]
    out = tmp_path / "pred.json"
    assert main(["predict", str(ckpt), *map(str, files), "--out", str(out), "--tta", "--no-gate"]) == 0
    np.testing.assert_allclose([r["prob_pneumonia"] for r in json.loads(out.read_text())],
                               [r.prob_pneumonia for r in with_tta], rtol=1e-6)
    with pytest.raises(ValueError, match="torch backend only"):
        Predictor(ckpt, backend="onnx", tta=True)


# --- a model file whose threshold was chosen with TTA (eval.tta) -----------------------------

NAMES = tuple(v.name for v in TTA_VIEWS)


@pytest.mark.parametrize(("recorded", "requested", "expected", "warns"), [
    ((), None, None, False),  # the file's way: none
    ((), False, None, False),
    ((), True, TTA_VIEWS, True),  # opt-in against the file: warned
    (NAMES, None, TTA_VIEWS, False),  # the file's way: its views
    (NAMES, True, TTA_VIEWS, False),
    (NAMES, False, None, True),  # --no-tta against the file: warned
    (("identity", "rotate+3deg"), None, (IDENTITY, TTA_VIEWS[3]), False),  # exactly the recorded views
])
def test_resolve_tta(recorded: tuple[str, ...], requested: bool | None, expected: object, warns: bool,
                     caplog: pytest.LogCaptureFixture) -> None:
    from pneumoscope.evaluation.tta import resolve_tta

    with caplog.at_level("WARNING"):
        assert resolve_tta(recorded, requested, where="m.safetensors") == expected
    assert bool(caplog.records) == warns
    if warns:
        assert "m.safetensors" in caplog.text and "threshold was chosen with" in caplog.text
    with pytest.raises(ValueError, match=r"unknown test-time augmentation view\(s\) \['flip'\]"):
        resolve_tta(("flip",), requested)


@pytest.fixture(scope="module")
def tta_ckpt(model: XrayClassifier, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tta") / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing,
                                          threshold=0.4, tta=NAMES))


def test_a_file_chosen_with_tta_is_used_with_tta_by_default(
        model: XrayClassifier, tta_ckpt: Path, kermany_tree: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from pneumoscope.cli import build_parser
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint
    from pneumoscope.models.checkpoint import read_info
    from pneumoscope.serve.predict import Predictor

    assert read_info(tta_ckpt).tta == NAMES
    report = evaluate_checkpoint(tta_ckpt, kermany_tree, tmp_path / "e", n_bootstrap=0, gate=False)
    assert report["tta"] == list(NAMES)
    files = sorted((kermany_tree / "test").rglob("*.png"))[:3]
    default = Predictor(tta_ckpt, gate=False)
    assert default.tta == TTA_VIEWS
    images = np.stack([default.decode_bytes(f).gray for f in files])
    np.testing.assert_allclose([r.prob_pneumonia for r in default.predict_files(files, progress=False)],
                               predict_proba(model, images, tta=TTA_VIEWS), rtol=1e-5)
    caplog.clear()
    with caplog.at_level("WARNING"):
        off = evaluate_checkpoint(tta_ckpt, kermany_tree, tmp_path / "off", n_bootstrap=0, gate=False,
                                  tta=False)
    assert "threshold was chosen with it" in caplog.text and off["tta"] is None
    parser = build_parser()
    for command in (["evaluate", "m", "--data", "d"], ["predict", "m", "x.png"], ["serve", "m"]):
        assert [parser.parse_args([*command, *flag]).tta for flag in ([], ["--tta"], ["--no-tta"])] \
            == [None, True, False]
    assert Predictor(tta_ckpt, gate=False, tta=False).tta is None


def test_the_onnx_backend_refuses_a_file_chosen_with_tta(tta_ckpt: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    from pneumoscope.cli import main
    from pneumoscope.serve.predict import Predictor

    with pytest.raises(ValueError, match="chosen with test-time augmentation, which the onnx backend"):
        Predictor(tta_ckpt, backend="onnx", gate=False)
    assert Predictor(tta_ckpt, backend="onnx", gate=False, tta=False).tta is None  # asked for: warned
    pytest.importorskip("uvicorn")
    # serve --tta with the onnx backend: one line, exit 2, before anything listens.
    assert main(["serve", str(tta_ckpt), "--backend", "onnx", "--tta"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("pneumoscope: error: ") and "torch backend only" in last


def test_serve_shows_tta_in_the_model_card(tta_ckpt: Path, model: XrayClassifier, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    plain = save_checkpoint(tmp_path / "plain.safetensors", model,
                            CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))
    cases = [(tta_ckpt, None, list(NAMES), list(NAMES)), (tta_ckpt, False, [], list(NAMES)),
             (plain, None, [], []), (plain, True, list(NAMES), [])]
    for path, flag, views, chosen in cases:
        with TestClient(create_app(path, tta=flag)) as client:
            card = client.get("/v1/model").json()
        assert card["tta"] == {"views": views, "threshold_chosen_with": chosen}, (path.name, flag)
