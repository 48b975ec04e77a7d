"""Batch prediction with a trained model (``.safetensors`` checkpoint or exported ``.onnx``).

:class:`Predictor` loads the model once and is safe to share between threads (a web service
does). Files are decoded through :func:`pneumoscope.data.decode.load_grayscale`, the same path
as training, so a prediction sees the pixels the model was trained on.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pneumoscope.data.datasets import to_model_input_numpy
from pneumoscope.data.decode import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    ImageDecodeError,
    load_grayscale,
    resize_square,
)
from pneumoscope.models.checkpoint import CheckpointInfo

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")


@dataclass(frozen=True)
class PredictionRow:
    """One input's result: a probability and label, or the reason it could not be read."""

    path: str
    prob_pneumonia: float | None
    label: str | None
    """Class name at the model's threshold (``prob >= threshold`` is the positive class)."""
    threshold: float
    model: str
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _images_under(folder: Path) -> list[Path]:
    # Hidden files are skipped: macOS "._x.png" resource forks are not images.
    return [p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")]


def collect_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files, folders (searched recursively for image files, ``.dcm`` included) and glob
    patterns → a sorted list without duplicates. A file named explicitly is taken whatever
    its suffix (the decoder goes by content). A missing path or a pattern/folder matching
    nothing raises, naming it."""
    found: dict[Path, Path] = {}

    def add(path: Path) -> None:
        found.setdefault(path.resolve(), path)

    for pattern in patterns:
        text = str(pattern)
        path = Path(text)
        if path.is_file():
            add(path)
        elif path.is_dir():
            images = _images_under(path)
            if not images:
                raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
            for p in images:
                add(p)
        elif _is_glob(text):
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            files = [m for m in matches if m.is_file()]
            files += [p for m in matches if m.is_dir() for p in _images_under(m)]
            if not files:
                raise ValueError(f"no files match {text}")
            for p in files:
                add(p)
        else:
            raise FileNotFoundError(f"input not found: {text}")
    return sorted(found.values(), key=str)


class Predictor:
    """A loaded model that turns images into pneumonia probabilities.

    ``model_path``: a ``.safetensors`` checkpoint or an ``.onnx`` file from ``pneumoscope
    export``. ``backend``: ``torch`` or ``onnx``; None picks by the file (``.onnx`` → onnx).
    The onnx backend given a checkpoint exports it in memory first (parity is the exporter's
    job; run ``pneumoscope export`` to check it and keep the file).

    Thread safety: the torch model is called under a lock (``predict_proba`` switches the
    module to eval mode and torch's intra-op pool already uses every core, so concurrent
    forwards would only contend). ONNX Runtime's ``InferenceSession.run`` is documented as
    thread-safe, so the onnx backend runs without a lock.
    """

    info: CheckpointInfo
    """Model name, preprocessing, threshold and class names (from the checkpoint or .onnx)."""

    def __init__(self, model_path: str | Path, backend: Backend | None = None, *,
                 max_pixels: int = MAX_PIXELS, threads: int | None = None) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        is_onnx = path.suffix.lower() == ".onnx"
        backend = backend or ("onnx" if is_onnx else "torch")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        if backend == "torch" and is_onnx:
            raise ValueError(f"{path} is an ONNX file: use the onnx backend (--backend onnx)")
        self.path = path
        self.backend: str = backend
        self.max_pixels = max_pixels
        self._lock = threading.Lock()
        self._model: Any = None
        self._session: Any = None
        if backend == "torch":
            from pneumoscope.models.checkpoint import load_checkpoint

            # channels_last: oneDNN's faster NHWC convolutions on CPU (see models.factory).
            self._model, self.info = load_checkpoint(path, channels_last=True)
        else:
            from pneumoscope.serve import export

            if is_onnx:
                self._session = export.ort_session(path, threads)
                self.info = export.info_from_metadata(
                    export.session_metadata(self._session, str(path)), str(path))
            else:
                from pneumoscope.models.checkpoint import load_checkpoint

                model, self.info = load_checkpoint(path)
                log.info("exporting %s to ONNX in memory for the onnx backend", path)
                self._session = export.ort_session(
                    export.export_bytes(model, self.info, source=path.name), threads)
        log.info("loaded %s (%s, %s backend, %d px, threshold %.3f)", path, self.info.model,
                 self.backend, self.image_size, self.threshold)

    @property
    def image_size(self) -> int:
        return self.info.preprocessing.image_size

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def label(self, prob: float) -> str:
        """The class name a probability gets at the model's threshold."""
        return self.info.class_names[1] if prob >= self.threshold else self.info.class_names[0]

    def _row(self, path: str, prob: float | None, error: str | None = None) -> PredictionRow:
        return PredictionRow(path=path, prob_pneumonia=prob,
                             label=None if prob is None else self.label(prob),
                             threshold=self.threshold, model=self.info.model, error=error)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 (N, S, S) images already at the model's size."""
        if self._session is not None:
            from pneumoscope.serve.export import INPUT_NAME, OUTPUT_NAME

            x = to_model_input_numpy(batch)
            return self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float64)
        from pneumoscope.evaluation.inference import predict_proba

        with self._lock:
            return predict_proba(self._model, batch, batch_size=len(batch))

    def predict_images(self, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Probability of pneumonia for each 2-D uint8 grayscale image (any size), float64 (N,)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        out = np.empty(len(images), dtype=np.float64)
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            resized = []
            for i, img in enumerate(chunk, start):
                arr = np.asarray(img)
                if arr.ndim != 2 or arr.dtype != np.uint8:
                    raise ValueError(f"image {i}: expected a 2-D uint8 grayscale array, "
                                     f"got {arr.dtype} {arr.shape}")
                resized.append(resize_square(arr, self.image_size))
            out[start:start + len(resized)] = self._run(np.stack(resized))
        return out

    def predict_bytes(self, data: bytes, name: str = "<bytes>") -> PredictionRow:
        """Predict one encoded image (JPEG/PNG/DICOM bytes). Raises
        :class:`~pneumoscope.data.decode.ImageDecodeError` for unreadable data."""
        try:
            gray = load_grayscale(data, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            # The decoder names the source "<bytes>"; a service passes the upload's name.
            raise ImageDecodeError(str(exc).replace("<bytes>", name, 1)) from exc
        return self._row(name, float(self.predict_images([gray])[0]))

    def _decode(self, path: Path) -> np.ndarray | str:
        try:
            return resize_square(load_grayscale(path, max_pixels=self.max_pixels), self.image_size)
        except ImageDecodeError as exc:
            return str(exc)

    def predict_files(self, paths: Sequence[str | Path], batch_size: int = 32,
                      progress: bool = True, workers: int | None = None) -> list[PredictionRow]:
        """One row per path, in order. A file that cannot be decoded (corrupt, empty, not an
        image, unsupported DICOM, too large) gets a row with ``error`` set; the rest go on."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        from pneumoscope.serve.export import available_cores

        rows: list[PredictionRow] = []
        # Decoding (Pillow, pydicom, numpy) releases the GIL for the heavy parts: a few threads
        # keep the model fed; batches bound the memory to batch_size decoded images.
        with ThreadPoolExecutor(max_workers=workers or min(4, available_cores())) as pool, \
                tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress) as bar:
            for start in range(0, len(paths), batch_size):
                chunk = [Path(p) for p in paths[start:start + batch_size]]
                decoded = list(pool.map(self._decode, chunk))
                good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
                probs = self._run(np.stack([decoded[i] for i in good])) if good else np.empty(0)
                by_index = dict(zip(good, probs.tolist(), strict=True))
                for i, (path, d) in enumerate(zip(chunk, decoded, strict=True)):
                    if isinstance(d, str):
                        log.warning("%s", d)
                        rows.append(self._row(str(path), None, d))
                    else:
                        rows.append(self._row(str(path), by_index[i]))
                bar.update(len(chunk))
        return rows


ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PredictionRow))


def write_rows(rows: Sequence[PredictionRow], out: str | Path) -> Path:
    """Write rows as CSV (``.csv``) or a JSON list (``.json``), chosen by the suffix."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ValueError(f"output must end in .csv or .json, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        out.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    else:
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if v is None else v for k, v in r.to_dict().items()})
    return out


__all__ = ["BACKENDS", "PredictionRow", "Predictor", "collect_inputs", "write_rows"]
