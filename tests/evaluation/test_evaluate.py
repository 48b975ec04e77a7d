from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pneumoscope.data.records import ImageRecord
from pneumoscope.evaluation.evaluate import evaluate_predictions
from pneumoscope.runs import read_predictions, write_predictions


def _case() -> tuple[np.ndarray, np.ndarray, list[ImageRecord]]:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 40 + [1] * 60)
    probs = np.clip(labels * 0.4 + rng.random(100) * 0.6, 0, 1)
    records = [ImageRecord(f"/d/{i}.jpeg", int(y), "test", f"p{i}",
                           ("bacteria" if i % 2 else "virus") if y else "",
                           (("site", "A" if i % 3 else "B"),))
               for i, y in enumerate(labels)]
    return labels, probs, records


def test_report_has_both_operating_points_cis_and_breakdowns() -> None:
    labels, probs, records = _case()
    report = evaluate_predictions(labels, probs, 0.6, records=records, n_bootstrap=200,
                                  group_by="site")
    assert report["at_threshold"]["threshold"] == 0.6 and report["at_0.5"]["threshold"] == 0.5
    for point in ("at_threshold", "at_0.5"):
        metrics, ci = report[point]["metrics"], report[point]["ci95"]
        assert set(ci) == set(metrics)
        for name, value in metrics.items():
            assert ci[name][0] <= value + 1e-9 and value <= ci[name][1] + 1e-9, name
    conf = report["at_threshold"]["confusion"]
    assert sum(conf.values()) == 100
    sub = report["by_subtype"]
    assert sub["bacteria"]["n"] + sub["virus"]["n"] == 60 and sub["normal"]["n"] == 40
    expected = np.mean(probs[[i for i, r in enumerate(records) if r.subtype == "virus"]] >= 0.6)
    assert sub["virus"]["sensitivity"] == pytest.approx(expected)
    assert set(report["by_group"]["site"]) == {"A", "B"}


def test_predictions_csv_round_trip(tmp_path: Path) -> None:
    labels, probs, records = _case()
    write_predictions(tmp_path / "p.csv", records, probs, 0.6)
    saved = read_predictions(tmp_path / "p.csv")
    assert [r.label for r in saved.records] == labels.tolist()
    np.testing.assert_allclose(saved.probs, probs, atol=1e-6)
    assert saved.predicted.tolist() == (probs >= 0.6).astype(int).tolist()


def test_evaluate_checkpoint_on_folders_and_pneumoniamnist(kermany_tree: Path, tmp_path: Path) -> None:
    from pneumoscope.data.synthetic import write_pneumoniamnist_npz
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint
    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    model = build_model("resnet18", "none", image_size=32)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing,
                                          threshold=0.42))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,site\n" + "".join(
        f"{p.name},{'A' if i % 2 else 'B'}\n"
        for i, p in enumerate(sorted((kermany_tree / "test").rglob("*.*")))))
    report = evaluate_checkpoint(ckpt, kermany_tree, tmp_path / "ev", manifest=manifest,
                                 group_by="site", n_bootstrap=50)
    assert report["split"] == "test" and report["threshold"] == 0.42
    assert set(report["by_group"]["site"]) == {"A", "B"}
    npz = write_pneumoniamnist_npz(tmp_path / "pm.npz")
    report = evaluate_checkpoint(ckpt, npz, tmp_path / "ev2", n_bootstrap=0, stress=True)
    with np.load(npz) as data:
        assert report["n"] == len(data["test_labels"])
    from pneumoscope.evaluation.stress import STRESS_TESTS

    # The stress report is at the checkpoint's threshold; "clean" repeats the plain result.
    assert list(report["stress"]) == ["clean", *STRESS_TESTS]
    assert report["stress"]["clean"]["specificity"] == pytest.approx(
        report["at_threshold"]["metrics"]["specificity"], nan_ok=True)
    with pytest.raises(ValueError, match="split 'nope'"):
        evaluate_checkpoint(ckpt, kermany_tree, tmp_path / "ev3", split="nope")
