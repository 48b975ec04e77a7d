"""INT8 ONNX export: static quantization calibrated on validation films, written only when it
keeps the model's answers.

ONNX Runtime's ``quantize_static`` (QDQ format, uint8 activations, int8 per-channel weights:
the U8S8 kernels ORT's CPU provider runs fastest on x86; or symmetric int8 activations,
:data:`ACTIVATIONS`) with MinMax ranges collected on validation images, after ORT's
``quant_pre_process`` (shape inference and graph optimisation); shape arithmetic stays in
float (:func:`shape_nodes`). The quantized model is then run beside the fp32 one on every
validation image; it is written only if its validation AUC stays within ``auc_tolerance`` of
the fp32 AUC and its label (at the model's threshold) agrees on at least ``min_agreement`` of
the images. Both numbers go into the sidecar JSON under ``quantization``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscope.data.datasets import to_model_input_numpy
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.export.onnx import (
    INPUT_NAME,
    META_KEY,
    OUTPUT_NAME,
    ParityError,
    _import,
    check_parity,
    export_bytes,
    onnx_metadata,
    ort_session,
)
from pneumoscope.jsonio import write_json
from pneumoscope.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

QUANTIZATION = "int8-static-qdq"

ACTIVATIONS: tuple[str, ...] = ("uint8", "int8-symmetric")
"""How activations are quantized: ``uint8`` (asymmetric, the default) or ``int8-symmetric``
(zero point 0), an option to try on a model the default refuses (benchmarks/int8_parity.py
measures both on trained models)."""


class Int8ParityError(ParityError):
    """The INT8 model does not keep the model's answers; ``record`` holds what was measured
    (the sidecar's ``quantization`` entry it would have had)."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


@dataclass(frozen=True)
class Int8Rule:
    """When an INT8 model may replace the fp32 one (validation images, the model's threshold)."""

    auc_tolerance: float = 0.003
    """Largest |AUC(int8) - AUC(fp32)|."""
    min_agreement: float = 0.995
    """Smallest share of images whose label is the same under both."""
    calibration_images: int = 256
    """Validation images (evenly spread) whose activation ranges calibrate the quantization."""
    activations: str = "uint8"
    """One of :data:`ACTIVATIONS`."""

    def __post_init__(self) -> None:
        if not 0 <= self.auc_tolerance <= 1:
            raise ValueError(f"auc_tolerance must be in [0, 1], got {self.auc_tolerance!r}")
        if not 0 <= self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement!r}")
        if self.calibration_images < 1:
            raise ValueError(f"calibration_images must be at least 1, got {self.calibration_images!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")


def _batches(images: np.ndarray, size: int = 32) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield to_model_input_numpy(images[start:start + size])


def shape_nodes(graph: Any) -> list[str]:
    """Names of the nodes of an ONNX graph that compute tensor shapes, not pixels: a ``Shape``
    node and every node whose inputs are all such results or constants. timm's "same" padding
    (EfficientNet-Lite) computes its pad widths this way in float (Cast, Div, Ceil, Clip ...);
    quantized, the pad widths change and so does every later feature map (the INT8 model of a
    trained Lite0 kept 97.19 % of its validation labels that way, 99.06 % without:
    benchmarks/int8_parity.py)."""
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    shapes: set[str] = set()
    names = []
    for node in graph.node:  # topologically sorted, as ONNX requires
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" or (any(i in shapes for i in inputs)
                                       and all(i in shapes or i in constants for i in inputs)):
            shapes.update(node.output)
            names.append(node.name)
    return names


def quantize_int8(fp32: bytes, calibration: np.ndarray, activations: str = "uint8") -> bytes:
    """The INT8 (QDQ) model of an exported fp32 model, calibrated on uint8 (N, S, S) images;
    ``activations``: one of :data:`ACTIVATIONS`. Shape arithmetic (:func:`shape_nodes`) stays
    in float."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    quantization = _import("onnxruntime.quantization")
    onnx = _import("onnx")

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {INPUT_NAME: batch}

        def rewind(self) -> None:
            self._it = _batches(calibration, 16)

    with tempfile.TemporaryDirectory(prefix="pneumoscope-int8-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quantization.quant_pre_process(onnx.load_from_string(fp32), str(pre))
        excluded = shape_nodes(onnx.load(str(pre)).graph)
        symmetric = activations == "int8-symmetric"
        quantization.quantize_static(
            str(pre), str(out), Reader(), quant_format=quantization.QuantFormat.QDQ,
            activation_type=quantization.QuantType.QInt8 if symmetric else quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8, per_channel=True,
            calibrate_method=quantization.CalibrationMethod.MinMax, nodes_to_exclude=excluded,
            extra_options={"ActivationSymmetric": symmetric})
        return out.read_bytes()


def with_metadata(int8: bytes, info: Any, source: str = "") -> bytes:
    """An INT8 model with the PneumoScope metadata of ``info`` (and ``quantization``) embedded,
    so ``predict`` and ``serve`` load it like any exported model."""
    onnx = _import("onnx")
    proto = onnx.load_from_string(int8)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key = META_KEY
    entry.value = json.dumps({**onnx_metadata(info, source), "quantization": QUANTIZATION})
    return proto.SerializeToString()


def probabilities(session: Any, images: np.ndarray) -> np.ndarray:
    """P(positive) of an ORT session for uint8 (N, S, S) images, float64 (N,)."""
    if not len(images):
        return np.empty(0)
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: x})[0] for x in _batches(images)]
                          ).astype(np.float64)


def int8_parity(fp32: Any, int8: Any, images: np.ndarray, labels: np.ndarray,
                threshold: float) -> dict[str, Any]:
    """AUC of both sessions on labelled images and the share of equal labels at ``threshold``."""
    p32, p8 = probabilities(fp32, images), probabilities(int8, images)
    auc32 = binary_metrics(labels, p32, threshold)["auc"]
    auc8 = binary_metrics(labels, p8, threshold)["auc"]
    flipped = (p32 >= threshold) != (p8 >= threshold)
    return {"n_images": len(images), "auc_fp32": auc32, "auc_int8": auc8,
            "auc_difference": auc8 - auc32, "label_agreement": float(np.mean(~flipped)),
            "max_abs_prob_diff": float(np.max(np.abs(p32 - p8))), "threshold": threshold,
            # How borderline the films whose label changed were (under fp32).
            "flipped": int(flipped.sum()),
            "flipped_max_fp32_distance": float(np.max(np.abs(p32[flipped] - threshold))) if flipped.any()
            else None}


def export_int8(checkpoint: str | Path, images: np.ndarray, labels: np.ndarray,
                out: str | Path | None = None, *, rule: Int8Rule = Int8Rule(), opset: int = 17,
                calibration: np.ndarray | None = None) -> Path:
    """Export ``checkpoint`` as an INT8 ONNX model at ``out`` (default: ``<name>.int8.onnx``)
    with its sidecar ``<out>.json``, calibrated and checked on the validation ``images`` (uint8
    (N, S, S) at the model's size) and ``labels``. ``calibration``: other images to calibrate
    on (default: ``rule.calibration_images`` of ``images``). Raises :class:`Int8ParityError`
    (a :class:`ParityError` carrying the numbers), and writes nothing, when the rule is not met."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_suffix(".int8.onnx")
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"ONNX output must end in .onnx, got {out}")
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"expected uint8 (N, S, S) images and N labels, got {images.dtype} "
                         f"{images.shape} and {labels.shape}")
    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    if images.shape[1:] != (size, size):
        raise ValueError(f"validation images are {images.shape[1]}x{images.shape[2]}; the model takes {size}")
    fp32 = export_bytes(model, info, opset=opset, source=checkpoint.name)
    fp32_session = ort_session(fp32)
    torch_diff = check_parity(model, fp32_session)
    if calibration is None:
        pick = np.unique(np.linspace(0, len(images) - 1, min(rule.calibration_images, len(images))).round())
        calibration = images[pick.astype(int)]
    log.info("quantizing %s to INT8 (calibration: %d images)", checkpoint, len(calibration))
    int8 = quantize_int8(fp32, calibration, rule.activations)
    parity = int8_parity(fp32_session, ort_session(int8), images, labels, info.threshold)
    record = {"type": QUANTIZATION, "weights": "int8, per channel", "shape_arithmetic": "float",
              **asdict(rule), "calibration": "MinMax", "calibration_images": len(calibration), **parity,
              "fp32_vs_torch_max_abs_diff": torch_diff,
              "runtime": f"onnxruntime {_import('onnxruntime').__version__}"}
    ok = (abs(parity["auc_difference"]) <= rule.auc_tolerance
          and parity["label_agreement"] >= rule.min_agreement)  # NaN fails both
    if not ok:
        raise Int8ParityError(
            f"{out}: INT8 does not keep the model's answers on {parity['n_images']} validation images: "
            f"AUC {parity['auc_int8']:.4f} vs fp32 {parity['auc_fp32']:.4f} (tolerance "
            f"{rule.auc_tolerance:g}), labels agree on {100 * parity['label_agreement']:.2f}% (need "
            f"{100 * rule.min_agreement:g}%); the INT8 model is not written", record)
    meta = {**onnx_metadata(info, checkpoint.name), "quantization": QUANTIZATION}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    tmp.write_bytes(with_metadata(int8, info, checkpoint.name))
    tmp.replace(out)
    write_json(f"{out}.json", {**meta, "opset": opset, "quantization": record})
    log.info("exported %s -> %s (INT8: AUC %.4f vs %.4f, labels agree %.2f%%)", checkpoint, out,
             parity["auc_int8"], parity["auc_fp32"], 100 * parity["label_agreement"])
    return out


__all__ = ["ACTIVATIONS", "Int8ParityError", "Int8Rule", "export_int8", "int8_parity", "quantize_int8",
           "shape_nodes", "with_metadata"]
