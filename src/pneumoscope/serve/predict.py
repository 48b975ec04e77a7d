"""Batch prediction with a trained model (``.safetensors`` checkpoint or exported ``.onnx``).

:class:`Predictor` loads the model once and is safe to share between threads (a web service
does). Files are decoded through :func:`pneumoscope.data.decode.load_grayscale`, the same path
as training, so a prediction sees the pixels the model was trained on.

Many files: :meth:`Predictor.iter_predict` yields rows batch by batch (decoding runs ahead in a
few threads) and :func:`predict_to_file` appends them to a result file as they come, resumable
(see :mod:`pneumoscope.serve.results`).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from itertools import chain, islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pneumoscope.data.datasets import to_model_input_numpy
from pneumoscope.data.decode import MAX_PIXELS, DecodedImage, ImageDecodeError, decode_image, resize_square
from pneumoscope.data.inputs import InputEntry, collect_inputs, file_entry, scan_inputs
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.tta import resolve_tta
from pneumoscope.export import onnx as export
from pneumoscope.guard.gate import Gate, Verdict
from pneumoscope.guard.model_file import load_gate
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint
from pneumoscope.runtime import available_cores
from pneumoscope.serve.results import FORMATS, ResultWriter, safe_path

log = logging.getLogger(__name__)

UNCERTAIN_LABEL = "UNCERTAIN"
"""The label inside an abstain band: a film for a reader, not a call."""

Backend = Literal["torch", "onnx"]
BACKENDS: tuple[str, ...] = ("torch", "onnx")


@dataclass(frozen=True)
class PredictionRow:
    """One input's result: a probability and label, or the reason it could not be read.

    ``gate``: the input gate's verdict: ``ok``; ``warn`` (unlike the training films: the
    probability is shown but unreliable); ``refuse`` (not a chest film: no probability, no
    label); ``off`` (``--no-gate``, recorded so a result file says the gate did not run)."""

    path: str
    prob_pneumonia: float | None
    label: str | None
    """Class name at the model's threshold (``prob >= threshold`` is the positive class)."""
    threshold: float
    model: str
    error: str | None = None
    gate: str | None = None
    gate_reason: str | None = None
    """The gate's reasons, ``;``-separated (e.g. ``colour-image``, ``ood-score-above-warn``)."""
    ood_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_onnx_file(path: str | Path) -> bool:
    """An exported ``.onnx`` model (by its suffix, which ``pneumoscope export`` always writes)."""
    return Path(path).suffix.lower() == ".onnx"


def resolve_backend(model_path: str | Path, backend: str | None = None) -> Backend:
    """The backend for a model file: ``backend`` as given, else ``onnx`` for an ``.onnx`` file and
    ``torch`` for a checkpoint. An unknown name or torch for an ONNX file raises."""
    chosen = backend or ("onnx" if is_onnx_file(model_path) else "torch")
    if chosen not in BACKENDS:
        raise ValueError(f"unknown backend {chosen!r}; choose from {', '.join(BACKENDS)}")
    if chosen == "torch" and is_onnx_file(model_path):
        raise ValueError(f"{model_path} is an ONNX file: use the onnx backend (--backend onnx)")
    return chosen  # type: ignore[return-value]


class Predictor:
    """A loaded model that turns images into pneumonia probabilities.

    ``model_path``: a ``.safetensors`` checkpoint or an ``.onnx`` file from ``pneumoscope
    export``. ``backend``: ``torch`` or ``onnx``; None picks by the file (``.onnx`` → onnx).
    The onnx backend given a checkpoint exports it in memory first (parity is the exporter's
    job; run ``pneumoscope export`` to check it and keep the file). ``tta``: average the
    logits over test-time augmentation views (torch backend only); ``None`` follows the model
    file (TTA when its threshold was chosen under it), True/False against the file warn
    (:func:`~pneumoscope.evaluation.tta.resolve_tta`); the onnx backend refuses a file whose
    threshold needs TTA unless ``tta=False``. ``draft``:
    decode large JPEGs and DICOMs at a reduced scale near the model's input size
    (:data:`~pneumoscope.data.decode.DRAFT_MARGIN`); False decodes every pixel (slower; the
    gate's size and colour checks read the same source facts either way).

    Thread safety: the torch model is called under a lock (``predict_proba`` switches the
    module to eval mode and torch's intra-op pool already uses every core, so concurrent
    forwards would only contend). ONNX Runtime's ``InferenceSession.run`` is documented as
    thread-safe, so the onnx backend runs without a lock.
    """

    info: CheckpointInfo
    """Model name, preprocessing, threshold and class names (from the checkpoint or .onnx)."""

    def __init__(self, model_path: str | Path, backend: Backend | None = None, *,
                 max_pixels: int = MAX_PIXELS, threads: int | None = None, gate: bool = True,
                 tta: bool | None = None, draft: bool = True) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        is_onnx = is_onnx_file(path)
        backend = resolve_backend(path, backend)
        if tta and backend != "torch":
            raise ValueError("test-time augmentation runs on the torch backend only (--backend torch "
                             "with a .safetensors model file)")
        self.path = path
        self.backend: str = backend
        self.max_pixels = max_pixels
        self.draft = draft
        self._lock = threading.Lock()
        self._model: Any = None
        self._session: Any = None
        if backend == "torch":
            # channels_last: oneDNN's faster NHWC convolutions on CPU (see models.factory).
            self._model, self.info = load_checkpoint(path, channels_last=True)
        else:
            if is_onnx:
                self._session = export.ort_session(path, threads)
                self.info = export.info_from_metadata(
                    export.session_metadata(self._session, str(path)), str(path))
            else:
                model, self.info = load_checkpoint(path)
                log.info("exporting %s to ONNX in memory for the onnx backend", path)
                self._session = export.ort_session(
                    export.export_bytes(model, self.info, source=path.name), threads)
        if backend != "torch" and self.info.tta and tta is None:
            # The views are torch ops before the model; an exported graph holds the model only.
            raise ValueError(f"{path}: its threshold was chosen with test-time augmentation, which the "
                             "onnx backend does not apply: use --backend torch with the .safetensors "
                             "file, or --no-tta to predict without it (the threshold then may not hold)")
        self.tta = resolve_tta(self.info.tta, tta, where=str(path))
        if is_onnx and gate:
            # An exported graph holds the classifier only: the learned score needs the checkpoint.
            log.warning("%s: an ONNX file carries no learned input gate, only the deterministic "
                        "checks run; serve the .safetensors with --backend onnx for the full gate",
                        path)
            self.gate = Gate.unfitted()
        else:
            self.gate = load_gate(path, self.info, enabled=gate)
        log.info("loaded %s (%s, %s backend, %d px, threshold %.3f, gate %s, tta %s)", path,
                 self.info.model, self.backend, self.image_size, self.threshold, self.gate.state,
                 "on" if self.tta else "off")

    @property
    def image_size(self) -> int:
        return self.info.preprocessing.image_size

    @property
    def draft_size(self) -> int | None:
        """The ``draft_size`` passed to the decoder (None: full decode)."""
        return self.image_size if self.draft else None

    @property
    def threshold(self) -> float:
        return self.info.threshold

    def label(self, prob: float) -> str:
        """The class name a probability gets at the model's threshold, or ``UNCERTAIN`` inside
        the model file's abstain band (where one was chosen on a site's films)."""
        band = self.info.abstain_band
        if band is not None and band[0] <= prob < band[1]:
            return UNCERTAIN_LABEL
        return self.info.class_names[1] if prob >= self.threshold else self.info.class_names[0]

    def _row(self, path: str, prob: float | None, error: str | None = None,
             verdict: Verdict | None = None) -> PredictionRow:
        if prob is not None and not math.isfinite(prob):
            # prob >= threshold is False for NaN: a broken model would answer NORMAL. Never a label.
            prob, error = None, f"{path}: the model gave a non-finite probability ({prob})"
        gate = None if verdict is None else verdict.status if self.gate.enabled else "off"
        if gate == "refuse":
            prob = None  # not a chest film: no probability, no label
        return PredictionRow(path=path, prob_pneumonia=prob,
                             label=None if prob is None else self.label(prob),
                             threshold=self.threshold, model=self.info.model, error=error,
                             gate=gate, gate_reason=";".join(verdict.reasons) if verdict else None,
                             ood_score=None if verdict is None else verdict.ood_score)

    def predict_decoded(self, names: Sequence[str], decoded: Sequence[DecodedImage]) -> list[PredictionRow]:
        """Rows for decoded images (any size; :meth:`decode_bytes` gives them at the model's):
        one model batch and one gate pass over the same pixels, a verdict per image."""
        resized = np.stack([resize_square(d.gray, self.image_size) for d in decoded])
        probs = self._run(resized)
        verdicts = self.gate.assess(decoded, resized)
        return [self._row(n, float(p), verdict=v) for n, p, v in zip(names, probs, verdicts, strict=True)]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 (N, S, S) images already at the model's size."""
        if self._session is not None:
            x = to_model_input_numpy(batch)
            return self._session.run([export.OUTPUT_NAME], {export.INPUT_NAME: x})[0].astype(np.float64)
        with self._lock:
            return predict_proba(self._model, batch, batch_size=len(batch), tta=self.tta)

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
        return self.predict_decoded([name], [self.decode_bytes(data, name)])[0]

    def decode_bytes(self, data: bytes | str | Path, name: str | None = None) -> DecodedImage:
        """An encoded image (bytes or a path) decoded and already at the model's size: an image
        waiting for a batch costs O(model input), not O(film); the gate reads the source's
        size and colour from the other fields. Raises
        :class:`~pneumoscope.data.decode.ImageDecodeError`."""
        decoded = decode_image(data, max_pixels=self.max_pixels, name=name, draft_size=self.draft_size)
        return replace(decoded, gray=resize_square(decoded.gray, self.image_size))

    def _decode(self, entry: InputEntry) -> DecodedImage | str:
        """An input decoded and already at the model's size, or the error text of its row."""
        if entry.error is not None:
            return f"{entry.path}: {entry.error}"
        try:
            return self.decode_bytes(entry.path)
        except ImageDecodeError as exc:
            return str(exc)

    def _rows(self, chunk: Sequence[InputEntry],
              decoded: Sequence[DecodedImage | str]) -> list[PredictionRow]:
        good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
        done = self.predict_decoded([str(chunk[i].path) for i in good],
                                     [decoded[i] for i in good]) if good else []  # type: ignore[misc]
        by_index = dict(zip(good, done, strict=True))
        rows = []
        for i, (entry, d) in enumerate(zip(chunk, decoded, strict=True)):
            if isinstance(d, str):
                log.warning("%s", d)
                rows.append(self._row(str(entry.path), None, d))
            else:
                rows.append(by_index[i])
        return rows

    def iter_predict(self, inputs: Iterable[InputEntry | str | Path], batch_size: int = 32,
                     decode_workers: int | None = None) -> Iterator[list[PredictionRow]]:
        """Rows batch by batch, in input order: memory stays at a few batches whatever the
        number of inputs. An input that cannot be read or decoded (an
        :class:`~pneumoscope.data.inputs.InputEntry` with an error, a corrupt, empty, too large
        or unsupported file) gets a row with ``error`` set; the rest go on.

        ``decode_workers``: threads that decode the next batch while the model runs this one
        (Pillow, pydicom and numpy release the GIL for the heavy parts); None: up to 4, by the
        cores available; 0: decode in this thread, one file after the other (as a single input
        always is)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if decode_workers is not None and decode_workers < 0:
            raise ValueError(f"decode_workers must be >= 0, got {decode_workers}")
        entries: Iterator[InputEntry] = (e if isinstance(e, InputEntry) else file_entry(e) for e in inputs)
        head = list(islice(entries, 2))
        entries = chain(head, entries)
        # One file has nothing to overlap: a decode thread would only add its start-up and compete
        # with the model's threads for the cores (the tail of a batch-1 call, speed2's predict).
        if decode_workers == 0 or len(head) < 2:
            while chunk := list(islice(entries, batch_size)):
                yield self._rows(chunk, [self._decode(e) for e in chunk])
            return
        workers = decode_workers or min(4, available_cores())
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            pending: deque[tuple[list[InputEntry], list[Future[DecodedImage | str]]]] = deque()

            def submit() -> None:
                if chunk := list(islice(entries, batch_size)):
                    pending.append((chunk, [pool.submit(self._decode, e) for e in chunk]))

            submit()
            while pending:
                chunk, futures = pending.popleft()
                submit()  # the next batch decodes while the model runs this one
                yield self._rows(chunk, [f.result() for f in futures])

    def predict_files(self, paths: Sequence[str | Path | InputEntry], batch_size: int = 32,
                      progress: bool = True, decode_workers: int | None = None) -> list[PredictionRow]:
        """One row per path, in order (all in memory: for many files use :meth:`iter_predict` or
        :func:`predict_to_file`)."""
        rows: list[PredictionRow] = []
        with tqdm(total=len(paths), desc="predicting", unit="img", disable=not progress) as bar:
            for batch in self.iter_predict(paths, batch_size, decode_workers):
                rows.extend(batch)
                bar.update(len(batch))
        return rows


ROW_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PredictionRow))


def write_rows(rows: Sequence[PredictionRow], out: str | Path) -> Path:
    """Write rows as CSV, JSON Lines or a JSON array, by the suffix (see
    :mod:`pneumoscope.serve.results`), replacing the file."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"output must end in {', '.join(FORMATS)}, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with ResultWriter(out, ROW_FIELDS) as writer:
        writer.write([r.to_dict() for r in rows])
    return out


@dataclass
class BatchCounts:
    """What :func:`predict_to_file` did: rows written, of which failed / refused by the gate /
    warned by the gate, and inputs skipped because ``resume`` found them in the output."""

    rows: int = 0
    failed: int = 0
    refused: int = 0
    warned: int = 0
    already_done: int = 0

    def add(self, rows: Sequence[PredictionRow]) -> None:
        self.rows += len(rows)
        self.failed += sum(r.error is not None for r in rows)
        self.refused += sum(r.gate == "refuse" for r in rows)
        self.warned += sum(r.gate == "warn" for r in rows)


def _check_same_model(writer: ResultWriter, predictor: Predictor) -> None:
    first = writer.first or {}
    try:
        same = (first.get("model") == predictor.info.model
                and abs(float(first.get("threshold")) - predictor.threshold) < 1e-9)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        same = False
    if not same:
        raise ValueError(f"{writer.out} holds results of another model ({first.get('model')}, threshold "
                         f"{first.get('threshold')}); --resume continues the same job: choose another --out")


def predict_to_file(predictor: Predictor, inputs: Sequence[InputEntry], out: str | Path | None = None, *,
                    resume: bool = False, batch_size: int = 32, decode_workers: int | None = None,
                    progress: bool = False,
                    on_batch: Callable[[list[PredictionRow]], None] | None = None) -> BatchCounts:
    """Predict ``inputs`` and append each batch's rows to ``out`` as soon as they exist (see
    :class:`~pneumoscope.serve.results.ResultWriter`: a kill loses at most the batch in flight).
    ``resume``: inputs whose path is already in ``out`` are skipped (same model required).
    ``out`` None: rows only go to ``on_batch``, called after each batch is written."""
    counts = BatchCounts()
    writer = ResultWriter(out, ROW_FIELDS, resume=resume) if out is not None else None
    with writer or nullcontext():
        todo: Sequence[InputEntry] = inputs
        if writer is not None and writer.first is not None:
            _check_same_model(writer, predictor)
            todo = [e for e in inputs if safe_path(e.path) not in writer.done]
            counts.already_done = len(inputs) - len(todo)
        with tqdm(total=len(todo), desc="predicting", unit="img", disable=not progress) as bar:
            for batch in predictor.iter_predict(todo, batch_size, decode_workers):
                if writer is not None:
                    writer.write([r.to_dict() for r in batch])
                counts.add(batch)
                if on_batch is not None:
                    on_batch(batch)
                bar.update(len(batch))
    return counts


__all__ = ["BACKENDS", "BatchCounts", "PredictionRow", "Predictor", "collect_inputs", "predict_to_file",
           "resolve_backend", "scan_inputs", "write_rows"]
