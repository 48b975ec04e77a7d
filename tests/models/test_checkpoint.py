from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumoscope import CLASS_NAMES
from pneumoscope.models.checkpoint import (
    CheckpointInfo,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from pneumoscope.models.factory import build_model


def test_round_trip_keeps_weights_and_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=48).eval()
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.73,
                          threshold_method="youden", metrics={"val": {"auc": 0.9}},
                          config={"train": {"epochs": 1}})
    path = save_checkpoint(tmp_path / "m.safetensors", model, info)
    loaded, got = load_checkpoint(path)
    assert got.threshold == pytest.approx(0.73) and got.class_names == CLASS_NAMES
    assert got.preprocessing == model.preprocessing and got.metrics == {"val": {"auc": 0.9}}
    assert got.created and got.version
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert read_info(path) == got


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_info(tmp_path / "missing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="not a PneumoScope checkpoint"):
        read_info(tmp_path / "x.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no PneumoScope metadata"):
        read_info(tmp_path / "plain.safetensors")


def test_temperature_and_provenance_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        raw = model(x)
    model.set_temperature(2.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw / 2.5)
    steps = ({"step": "calibrate", "date": "2025-01-01", "previous": {"threshold": 0.5}},)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, temperature=2.5,
                          provenance=steps)
    path = save_checkpoint(tmp_path / "t.safetensors", model, info)
    loaded, got = load_checkpoint(path)
    assert got.temperature == 2.5 and got.provenance == steps
    assert float(loaded.temperature) == 2.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), raw / 2.5)
    # The temperature is metadata, not a weight: the state dict is unchanged.
    assert "temperature" not in loaded.state_dict()


def test_checkpoint_without_the_new_fields_loads_with_defaults(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = build_model("resnet18", "none", image_size=32).eval()
    path = save_checkpoint(tmp_path / "new.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["pneumoscope"])
    del meta["temperature"], meta["provenance"]  # as written before these fields existed
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"pneumoscope": json.dumps(meta)})
    loaded, info = load_checkpoint(old)
    assert info.temperature == 1.0 and info.provenance == ()
    assert float(loaded.temperature) == 1.0


def test_temperature_must_match_and_be_positive(tmp_path: Path) -> None:
    model = build_model("resnet18", "none", image_size=32)
    model.set_temperature(2.0)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing)  # T = 1.0
    with pytest.raises(ValueError, match=r"temperature 2 but info\.temperature is 1"):
        save_checkpoint(tmp_path / "m.safetensors", model, info)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be"):
            model.set_temperature(bad)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("threshold", float("nan"), "threshold must be a finite number"),
    ("threshold", 2.0, "threshold must be a finite number in"),
    ("class_names", ["A", "B", "C"], "class_names must be two names"),
    ("arch_kwargs", {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "arch_kwargs may only hold"),
    ("bogus", 1, "unknown field"),
    ("preprocessing.std", [0.0, 0.2, 0.2], "preprocessing.std must be finite numbers > 0"),
    ("preprocessing.image_size", 1_000_000, "image_size must be an integer in 16..1024"),
])
def test_metadata_that_would_give_wrong_answers_is_refused_on_load(
        tmp_path: Path, field: str, value: object, message: str) -> None:
    import json

    from safetensors.torch import load_file, save_file

    model = build_model("resnet18", "none", image_size=32)
    path = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))
    meta = read_info(path).to_dict()
    if field.startswith("preprocessing."):
        meta["preprocessing"][field.split(".", 1)[1]] = value
    else:
        meta[field] = value
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={"pneumoscope": json.dumps(meta)})
    with pytest.raises(ValueError, match=message):
        load_checkpoint(bad)


def test_damaged_weights_are_refused_not_turned_into_nan_labels(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = build_model("resnet18", "none", image_size=32)
    path = save_checkpoint(tmp_path / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(path))
    tensors["backbone.fc.weight"][0, :4] = float("nan")
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="non-finite values"):
        load_checkpoint(tmp_path / "bad.safetensors")
