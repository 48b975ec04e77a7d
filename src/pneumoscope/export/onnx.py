"""ONNX export of a checkpoint: the whole classifier (normalisation and sigmoid included), its
metadata inside the ``.onnx`` file and in a sidecar JSON, and a parity check against PyTorch.

An exported model takes ``image``: float32 (N, 1, H, W) grayscale in [0, 1] (the same input as
:class:`~pneumoscope.models.factory.XrayClassifier`) and returns ``prob_pneumonia``: (N,). A deep
ensemble exports as one graph holding every member, their logits averaged as in PyTorch.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumoscope import __version__
from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.jsonio import write_json
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint
from pneumoscope.models.ensemble import Classifier
from pneumoscope.models.factory import Preprocessing
from pneumoscope.runtime import available_cores

log = logging.getLogger(__name__)

ONNX_FORMAT = "pneumoscope-onnx/1"
META_KEY = "pneumoscope"
INPUT_NAME = "image"
OUTPUT_NAME = "prob_pneumonia"
PARITY_TOLERANCE = 1e-4
ONNX_INSTALL_HINT = "pip install 'pneumoscope[onnx]'"


class ParityError(ValueError):
    """The exported model's probabilities differ from PyTorch's beyond the tolerance."""


class _Probabilities(nn.Module):
    """The classifier with its sigmoid, so an exported file gives probabilities directly."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image)).squeeze(1)


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ModuleNotFoundError(f"ONNX export and the onnx backend need {module}: "
                                  f"{ONNX_INSTALL_HINT}") from exc


def ort_session(model: str | Path | bytes, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session: intra-op threads = available cores (one image batch uses
    them all), one inter-op thread (the graph is a chain, parallel branches buy nothing)."""
    ort = _import("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        name = "<bytes>" if isinstance(model, bytes) else str(model)
        raise ValueError(f"{name}: not a loadable ONNX model ({exc})") from exc


def onnx_metadata(info: CheckpointInfo, source: str = "") -> dict[str, Any]:
    """What an exported model carries about itself (JSON-able)."""
    return {
        "format": ONNX_FORMAT,
        "model": info.model,
        "timm_name": info.timm_name,
        "preprocessing": info.preprocessing.to_dict(),
        "threshold": info.threshold,
        "threshold_method": info.threshold_method,
        "temperature": info.temperature,  # already applied inside the graph; for the record
        "provenance": [dict(step) for step in info.provenance],
        "abstain_band": list(info.abstain_band) if info.abstain_band else None,
        # The graph holds no test-time augmentation: an ONNX backend refuses such a file
        # unless told to predict without it (serve.predict.Predictor).
        "tta": list(info.tta),
        "ensemble": info.ensemble,  # all members are in the graph, averaged as in PyTorch
        "class_names": list(info.class_names),
        "version": info.version,
        "exported_with": __version__,
        "created": info.created,
        "source_checkpoint": source,
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", 1, info.preprocessing.image_size,
                                                                   info.preprocessing.image_size],
                  "range": [0.0, 1.0], "color": "grayscale"},
        "output": {"name": OUTPUT_NAME, "shape": ["N"], "meaning": f"P({info.class_names[1]})"},
    }


def info_from_metadata(meta: dict[str, Any], where: str = "") -> CheckpointInfo:
    """A :class:`CheckpointInfo` (weights-free fields only) from :func:`onnx_metadata`."""
    if meta.get("format") != ONNX_FORMAT:
        raise ValueError(f"{where}: unsupported metadata format {meta.get('format')!r} "
                         f"(expected {ONNX_FORMAT})")
    return CheckpointInfo(
        model=meta["model"], preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
        threshold=float(meta["threshold"]), threshold_method=meta.get("threshold_method", ""),
        class_names=tuple(meta["class_names"]), timm_name=meta.get("timm_name", ""),
        version=meta.get("version", ""), created=meta.get("created", ""),
        temperature=float(meta.get("temperature", 1.0)),
        provenance=tuple(dict(step) for step in meta.get("provenance", ())),
        abstain_band=tuple(meta["abstain_band"]) if meta.get("abstain_band") else None,
        tta=tuple(meta.get("tta") or ()),
        ensemble=meta.get("ensemble"))


def session_metadata(session: Any, where: str = "") -> dict[str, Any]:
    """The PneumoScope metadata of a loaded ORT session (needs no ``onnx`` package)."""
    props = session.get_modelmeta().custom_metadata_map
    if META_KEY not in props:
        raise ValueError(f"{where}: ONNX file has no PneumoScope metadata: was it written by "
                         "`pneumoscope export`?")
    return json.loads(props[META_KEY])


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The PneumoScope metadata embedded in an exported ``.onnx`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    onnx = _import("onnx")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path}: not an ONNX file ({exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ValueError(f"{path}: ONNX file has no PneumoScope metadata")
    return json.loads(props[META_KEY])


def export_bytes(model: Classifier, info: CheckpointInfo, *, opset: int = 17,
                 source: str = "") -> bytes:
    """Serialised ONNX model (sigmoid included, dynamic batch, metadata embedded)."""
    onnx = _import("onnx")
    size = model.preprocessing.image_size
    wrapper = _Probabilities(model).eval()
    example = torch.rand(2, 1, size, size)
    buf = io.BytesIO()
    # The TorchScript-based exporter (dynamo=False): it needs only torch and onnx, works offline
    # and exports these timm CNNs with a dynamic batch axis in seconds. The torch.export-based
    # default of torch >= 2.9 additionally needs onnxscript (not an install requirement here).
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper, (example,), buf, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    proto = onnx.load_from_string(buf.getvalue())
    meta = proto.metadata_props.add()
    meta.key, meta.value = META_KEY, json.dumps(onnx_metadata(info, source))
    proto.producer_name = "pneumoscope"
    proto.producer_version = __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def parity_images(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` synthetic phantoms (half with pneumonia) as uint8 (n, size, size)."""
    rng = np.random.default_rng(seed)
    return np.stack([make_phantom(rng, size=size, pneumonia=i % 2 == 1) for i in range(n)])


def check_parity(model: Classifier, session: Any, n: int = 4) -> float:
    """Max absolute difference between PyTorch and ONNX Runtime probabilities on ``n``
    synthetic images, fed as one batch."""
    images = parity_images(model.preprocessing.image_size, n)
    ref = predict_proba(model, images, batch_size=n)
    got = session.run([OUTPUT_NAME], {INPUT_NAME: to_model_input(images).numpy()})[0]
    return float(np.max(np.abs(ref - got.astype(np.float64))))


def export_onnx(checkpoint: str | Path, out: str | Path | None = None, opset: int = 17,
                check: bool = True) -> Path:
    """Export a checkpoint to ONNX at ``out`` (default: next to it, ``.onnx``), with a sidecar
    ``<out>.json`` holding the same metadata. ``check``: compare ONNX Runtime with PyTorch on
    synthetic images and raise :class:`ParityError` beyond 1e-4 (the result is recorded in
    the sidecar under ``parity``)."""
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else checkpoint.with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"ONNX output must end in .onnx, got {out}")
    model, info = load_checkpoint(checkpoint)
    if info.tta:
        log.warning("%s: its threshold was chosen with test-time augmentation (%s), which the ONNX "
                    "graph does not hold: the onnx backend refuses this file unless run with --no-tta",
                    checkpoint, ", ".join(info.tta))
    data = export_bytes(model, info, opset=opset, source=checkpoint.name)
    sidecar: dict[str, Any] = {**onnx_metadata(info, checkpoint.name), "opset": opset}
    if check:
        diff = check_parity(model, ort_session(data))
        sidecar["parity"] = {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "n_images": 4,
                             "runtime": f"onnxruntime {_import('onnxruntime').__version__}"}
        log.info("ONNX parity: max |p_onnx - p_torch| = %.3g over 4 images", diff)
        if not diff < PARITY_TOLERANCE:  # also catches NaN
            raise ParityError(f"{out}: ONNX Runtime and PyTorch disagree by {diff:.3g} "
                              f"(tolerance {PARITY_TOLERANCE}); the export is not written")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    write_json(f"{out}.json", sidecar)  # atomic, like the model file above
    log.info("exported %s -> %s", checkpoint, out)
    return out
