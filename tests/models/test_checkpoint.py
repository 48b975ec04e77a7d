from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumoscope import CLASS_NAMES
from pneumoscope.models.checkpoint import (
    CheckpointError,
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
    # Wrong types end as one message naming the field, never a TypeError from deep inside.
    ("threshold", "abc", "threshold must be a finite number in .* got 'abc'"),
    ("preprocessing.image_size", "big", "image_size must be an integer in 16..1024, got 'big'"),
    ("preprocessing.in_chans", 7, "in_chans must be 1 or 3"),
    ("preprocessing.mean", [0.5, 0.5], r"preprocessing\.mean must be finite numbers, one or in_chans"),
    ("preprocessing.resize", "crop", "resize must be 'squash-bicubic'"),
    ("preprocessing.extra", 1, r"preprocessing has unknown field\(s\) \['extra'\]"),
    ("provenance", 5, "provenance must be a list of mappings"),
    ("abstain_band", "ab", "abstain_band must be null or two numbers"),
    ("metrics", "x", "metrics must be a mapping"),
    ("threshold_method", ["x"], "threshold_method must be a string"),
    ("gate", "x", "gate must be a mapping or null"),
    ("tta", "identity", "tta must be a list of distinct view names"),
    ("tta", ["identity", "identity"], "tta must be a list of distinct view names"),
    # A view this version does not implement: the threshold would be applied to other scores.
    ("tta", ["identity", "flip"], r"tta names view\(s\) \['flip'\] this version does not implement"),
    ("arch_kwargs", {"bn_eps": "abc"}, r"arch_kwargs\.bn_eps must be a number"),
    ("model", "resnet19", "field model: unknown model 'resnet19'"),
    ("model", "efficientnet_b0", "its tensors do not fit model 'efficientnet_b0'"),
])
def test_metadata_that_would_give_wrong_answers_is_refused_on_load(
        tmp_path: Path, plain_file: Path, field: str, value: object, message: str) -> None:
    import json

    meta = read_info(plain_file).to_dict()
    if field.startswith("preprocessing."):
        meta["preprocessing"][field.split(".", 1)[1]] = value
    else:
        meta[field] = value
    bad = _rewrite(plain_file, tmp_path / "bad.safetensors", meta=json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid resnet18 model file at 32 px, written once for the tests that tamper with it."""
    model = build_model("resnet18", "none", image_size=32)
    return save_checkpoint(tmp_path_factory.mktemp("plain") / "m.safetensors", model,
                           CheckpointInfo(model="resnet18", preprocessing=model.preprocessing))


def _rewrite(path: Path, out: Path, *, meta: str | None = None, drop: str | None = None,
             keep_digest: bool = False) -> Path:
    """``path`` with other metadata or a tensor less. The digest is emptied (as in a file from
    before it) unless ``keep_digest``, so each test reaches the check it is about."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as fh:
        text = fh.metadata()["pneumoscope"] if meta is None else meta
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and not keep_digest:
        parsed["digest"] = ""
        text = json.dumps(parsed)
    tensors = {k: v for k, v in load_file(str(path)).items() if k != drop}
    save_file(tensors, str(out), metadata={"pneumoscope": text})
    return out


def test_a_file_changed_after_saving_is_refused_by_its_digest(tmp_path: Path, plain_file: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    assert len(read_info(plain_file).digest) == 64
    load_checkpoint(plain_file)  # the digest matches what was saved
    # One weight nudged: finite, plausible, wrong. Only the digest can tell.
    tensors = load_file(str(plain_file))
    tensors["backbone.layer1.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    with safe_open(str(plain_file), framework="pt") as fh:
        meta = fh.metadata()
    save_file(tensors, str(tmp_path / "nudged.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="damaged: its weights or metadata differ"):
        load_checkpoint(tmp_path / "nudged.safetensors")
    # The threshold edited by hand (a valid value): refused, pointing at calibrate.
    edited = json.loads(meta["pneumoscope"])
    edited["threshold"] = 0.7
    _rewrite(plain_file, tmp_path / "edited.safetensors", meta=json.dumps(edited), keep_digest=True)
    with pytest.raises(CheckpointError, match="pneumoscope calibrate"):
        load_checkpoint(tmp_path / "edited.safetensors")
    # A file from before the digest (none stored) loads as before.
    _rewrite(plain_file, tmp_path / "old.safetensors")
    assert read_info(tmp_path / "old.safetensors").digest == ""
    load_checkpoint(tmp_path / "old.safetensors")


@pytest.mark.parametrize(("meta", "drop", "message"), [
    ("[1, 2]", None, "metadata must be a JSON object, got list"),
    ("{not json", None, "unreadable PneumoScope metadata"),
    (None, "backbone.fc.weight", r"its tensors do not fit model 'resnet18' .*Missing key.*fc\.weight"),
])
def test_unusable_files_name_the_file(tmp_path: Path, plain_file: Path, meta: str | None,
                                      drop: str | None, message: str) -> None:
    bad = _rewrite(plain_file, tmp_path / "bad.safetensors", meta=meta, drop=drop)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(info.value).startswith(f"{bad}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(("gate", "message"), [
    ({"format": "pneumoscope-gate/1", "state": "not-fitted", "tolerances": "abc"},
     "tolerances must be a mapping"),
    ({"format": "pneumoscope-gate/1", "state": "fitted", "levels": {"warn": 1, "refuse": 2},
      "feature_spec": {"timm_kwargs": {"checkpoint_path": "/etc/passwd"}}, "image_size": 32,
      "n_fitted": 3, "dim": 3}, r"feature_spec\.timm_kwargs may only hold"),
])
def test_a_damaged_gate_is_refused_naming_the_file(tmp_path: Path, plain_file: Path, gate: dict,
                                                   message: str) -> None:
    import json

    from pneumoscope.guard.model_file import load_gate

    meta = read_info(plain_file).to_dict()
    meta["gate"] = gate
    bad = _rewrite(plain_file, tmp_path / "bad.safetensors", meta=json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"^{bad}: checkpoint field gate: .*{message}"):
        load_gate(bad)


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
    meta["pneumoscope"] = meta["pneumoscope"].replace(read_info(path).digest, "")  # no digest: as before it
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="non-finite values"):
        load_checkpoint(tmp_path / "bad.safetensors")


# The metadata of a plain model file as written before round 2's optional fields: a field
# added later must be left out when unset, or every older file's digest stops matching.
LEGACY_FIELDS = {"format", "model", "preprocessing", "threshold", "threshold_method", "class_names",
                 "timm_name", "arch_kwargs", "metrics", "config", "version", "created", "temperature",
                 "provenance", "abstain_band", "gate", "digest"}


def test_a_plain_file_keeps_the_metadata_fields_older_files_were_digested_with(plain_file: Path) -> None:
    import json

    from safetensors import safe_open

    with safe_open(str(plain_file), framework="pt") as fh:
        meta = json.loads(fh.metadata()["pneumoscope"])
    assert set(meta) == LEGACY_FIELDS
    load_checkpoint(plain_file)
