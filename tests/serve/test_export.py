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


@pytest.fixture(scope="module")
def separable(ckpt: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Validation films for the random model, labelled by its own fp32 ranking (AUC 1), and a
    copy of the checkpoint whose threshold sits in the widest gap between its probabilities.
    A random model's outputs barely differ between films, so its INT8 copy agrees on about
    97 % of the labels: under the default 99.5 %, above a loosened 95 %."""
    from pneumoscope.export.quantize import probabilities
    from pneumoscope.models.checkpoint import load_checkpoint

    rng = np.random.default_rng(11)
    n = 200
    images = np.stack([make_phantom(rng, 48, pneumonia=i % 2 == 1) for i in range(n)])
    model, info = load_checkpoint(ckpt)
    probs = probabilities(export.ort_session(export.export_bytes(model, info)), images)
    order = np.sort(probs)
    cut = n // 4 + int(np.argmax(np.diff(order)[n // 4:3 * n // 4]))
    threshold = float((order[cut] + order[cut + 1]) / 2)
    out = save_checkpoint(ckpt.parent / "separable.safetensors", model,
                          CheckpointInfo(model="resnet18", preprocessing=model.preprocessing,
                                         threshold=threshold))
    return out, images, (probs >= threshold).astype(np.int64)


def test_int8_export_within_the_rule_is_written_with_its_numbers(separable: tuple, tmp_path: Path) -> None:
    from pneumoscope.export.quantize import Int8Rule, export_int8

    model_file, images, labels = separable
    rule = Int8Rule(auc_tolerance=0.01, min_agreement=0.95)
    out = export_int8(model_file, images, labels, tmp_path / "m.int8.onnx", rule=rule)
    q = json.loads(Path(f"{out}.json").read_text())["quantization"]
    assert q["auc_fp32"] == 1.0 and abs(q["auc_difference"]) <= 0.01 == q["auc_tolerance"]
    assert 0.95 <= q["label_agreement"] < 1 and q["n_images"] == len(images) == q["calibration_images"]
    assert q["max_abs_prob_diff"] > 0  # really quantized
    assert export.read_onnx_metadata(out)["quantization"] == "int8-static-qdq"
    # The INT8 file is a model like any other: predict loads it and gives near-fp32 answers.
    probs = Predictor(out, gate=False).predict_images(list(images[:8]))
    fp32 = Predictor(model_file, "onnx", gate=False).predict_images(list(images[:8]))
    assert 0 < np.max(np.abs(probs - fp32)) <= q["max_abs_prob_diff"] + 1e-6


def test_int8_export_refuses_when_the_rule_fails(separable: tuple, tmp_path: Path) -> None:
    from pneumoscope.export.quantize import Int8Rule, export_int8

    model_file, images, labels = separable
    # The default rule (0.003 AUC, 99.5 % of the labels): this model's INT8 copy falls short.
    with pytest.raises(export.ParityError, match=r"labels agree on 9\d\.\d+% \(need 99.5%\)") as refused:
        export_int8(model_file, images, labels, tmp_path / "default.onnx")
    # The refusal carries what was measured (benchmarks/int8_parity.py reports it).
    record = refused.value.record  # type: ignore[attr-defined]
    assert 0.9 < record["label_agreement"] < 0.995 and record["n_images"] == len(images)
    assert record["activations"] == "uint8" and record["min_agreement"] == 0.995
    # Calibrated on black frames: every activation range is wrong, even the loose rule fails.
    with pytest.raises(export.ParityError, match="not written"):
        export_int8(model_file, images, labels, tmp_path / "bad.onnx",
                    rule=Int8Rule(auc_tolerance=0.01, min_agreement=0.95),
                    calibration=np.zeros((8, 48, 48), dtype=np.uint8))
    assert not list(tmp_path.glob("*.onnx*"))
    with pytest.raises(ValueError, match="min_agreement"):
        Int8Rule(min_agreement=1.5)
    with pytest.raises(ValueError, match=r"activations must be one of .* got 'int4'"):
        Int8Rule(activations="int4")


def test_cli_export_int8_needs_data(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(ckpt), "--quantize", "int8"]) == 2
    assert "--data" in capsys.readouterr().err


def test_cli_export_int8_on_the_models_validation_split(ckpt: Path, kermany_tree: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.int8.onnx"
    argv = ["export", str(ckpt), "--quantize", "int8", "--data", str(kermany_tree), "--out", str(out)]
    assert main([*argv, "--int8-auc-tolerance", "1", "--int8-min-agreement", "0",
                 "--int8-activations", "int8-symmetric"]) == 0
    q = json.loads(Path(f"{out}.json").read_text())["quantization"]
    assert q["n_images"] > 0 and q["auc_tolerance"] == 1 and q["min_agreement"] == 0
    assert q["activations"] == "int8-symmetric"
    assert f"labels agree on {100 * q['label_agreement']:.2f}%" in capsys.readouterr().out


def test_shape_arithmetic_is_not_quantized() -> None:
    """timm's "same" padding computes pad widths in float from Shape (Lite0's graph): those nodes
    stay in float; the pixels' path (Pad's data input, Conv, Clip) is quantized as usual."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from pneumoscope.export.quantize import shape_nodes

    node = helper.make_node
    graph = helper.make_graph(
        [node("Shape", ["x"], ["s"], name="shape"),
         node("Gather", ["s", "two"], ["h"], name="gather"),
         node("Cast", ["h"], ["hf"], name="cast", to=TensorProto.FLOAT),
         node("Div", ["hf", "stride"], ["q"], name="div"),
         node("Ceil", ["q"], ["c"], name="ceil"),
         node("Sub", ["c", "hf"], ["d"], name="sub"),
         node("Clip", ["d", "zero"], ["pad_f"], name="max0"),
         node("Cast", ["pad_f"], ["pad_i"], name="to_int", to=TensorProto.INT64),
         node("Concat", ["pad_i", "pad_i", "pad_i", "pad_i", "pad_i", "pad_i", "pad_i", "pad_i"], ["pads"],
              name="concat", axis=0),
         node("Pad", ["x", "pads"], ["padded"], name="pad"),
         node("Conv", ["padded", "w"], ["y"], name="conv"),
         node("Clip", ["y", "zero", "six"], ["out"], name="relu6")],
        "same-padding", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor("two", TensorProto.INT64, [1], [2]),
         helper.make_tensor("stride", TensorProto.FLOAT, [], [2.0]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("six", TensorProto.FLOAT, [], [6.0]),
         helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 3, 3], [0.1] * 9)])
    onnx.checker.check_graph(graph)
    assert shape_nodes(graph) == ["shape", "gather", "cast", "div", "ceil", "sub", "max0", "to_int", "concat"]
