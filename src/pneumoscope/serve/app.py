"""The web service: a FastAPI app that predicts and explains uploaded chest X-rays.

``pneumoscope serve model.safetensors`` runs it with uvicorn on 127.0.0.1:8000. Endpoints:

- ``POST /v1/predict`` (multipart, field ``file``) → ``{probability, label, threshold, model,
  version, latency_ms, ...}``
- ``POST /v1/explain`` (``file``; ``method``, default ``gradcam``; ``title``) → heatmap overlay PNG,
  probability and label in ``X-Probability`` / ``X-Label`` headers
- ``POST /v1/preview`` (``file``) → the decoded grayscale image as PNG (what the model sees)
- ``GET /v1/model`` → model card (``tta``: the test-time augmentation views predictions use, and
  those the threshold was chosen with); ``GET /healthz``; ``GET /`` → the web page; ``/docs`` (OpenAPI)

The model is loaded once, when the app is created. Predictions go through one shared
:class:`~pneumoscope.serve.predict.Predictor` (thread-safe); explanations need the PyTorch
model and hooks into it, so a second copy of the model is loaded for them only (the CAM code
forbids explaining a model that other threads run forward passes on). An ``.onnx`` file has no
PyTorch weights: with one, ``/v1/explain`` answers 501 (start from the ``.safetensors`` with
``--backend onnx`` to get both). A map explains the image as it is: its ``X-Probability`` is
that of the identity view, also when predictions average test-time augmentation views.

Uploads stay in memory (see :mod:`pneumoscope.serve.upload`), their type is decided by content
(JPEG, PNG, DICOM), and decoding and inference run in worker threads, at most
``max_concurrency`` at a time, so the event loop keeps answering (``/healthz`` included).
Predictions are batched dynamically (:mod:`pneumoscope.serve.batching`): uploads decoded
within ``batch_wait_ms`` of each other run as one model call of at most ``batch_max`` images
(``batch_max=1``: one call per request); each still gets its own gate verdict and errors.
Every error is JSON ``{"error": "..."}`` (except the plain-text 400 of an untrusted ``Host``).

Slow and abandoned clients cannot pile up (:class:`ServeLimits`): at most ``max_uploads``
requests are read or worked on at once (the next get 503 with ``Retry-After`` before their body
is read), a body must arrive within ``body_timeout_s`` (else 408), request headers within
``header_timeout_s`` (else the connection is closed), uvicorn answers 503 past
``max_connections`` connections, and a client that disconnects mid-upload costs one log line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pneumoscope import __version__
from pneumoscope.data.decode import MAX_ASPECT, MAX_PIXELS, ImageDecodeError, decode_image, resize_square
from pneumoscope.evaluation.tta import view_names
from pneumoscope.guard.gate import describe_reason
from pneumoscope.jsonio import json_safe
from pneumoscope.notice import INTENDED_USE, LIMITATIONS
from pneumoscope.serve.batching import DEFAULT_BATCH_MAX, DEFAULT_BATCH_WAIT_MS, Batcher
from pneumoscope.serve.limits import LOOPBACK_HOSTS, ServeLimits, default_allowed_hosts
from pneumoscope.serve.predict import Backend, Predictor, is_onnx_file
from pneumoscope.serve.upload import SUPPORTED_TYPES, Upload, UploadError, read_multipart, sniff_type

SERVE_INSTALL_HINT = "pip install 'pneumoscope[serve]'"

try:
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect
except ImportError as exc:  # an optional extra: say how to get it
    raise ModuleNotFoundError(f"the web service needs FastAPI and uvicorn ({exc}); install them with "
                              f"`{SERVE_INSTALL_HINT}`") from exc

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
RETRY_AFTER_S = 2
DISPLAY_MAX_SIDE = 512
"""Longest side of the preview and overlay images the service returns."""

SERVICE_CAM_METHODS: tuple[str, ...] = (
    "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam")
"""CAM methods the service offers. ScoreCAM and AblationCAM run hundreds of forward passes per
image (minutes on a CPU): one request could occupy the service, so they are CLI-only."""

_STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                 "style.css": "text/css; charset=utf-8"}
# The page uses only its own files: no inline script, no CDN (it must work offline).
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

_UPLOAD_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "chest X-ray: JPEG, PNG (8/16-bit) or DICOM; type decided by content"},
    }}}}}}
_EXPLAIN_DOC: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file"], "properties": {
        "file": _UPLOAD_DOC["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["file"],
        "method": {"type": "string", "enum": list(SERVICE_CAM_METHODS), "default": "gradcam"},
        "title": {"type": "boolean", "default": True,
                  "description": "false: no title strip, the PNG has the preview's size"},
    }}}}}}
_ERROR_DOC = {"content": {"application/json": {"example": {"error": "why"}}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "not a multipart/form-data body", **_ERROR_DOC},
    413: {"description": "upload larger than the limit", **_ERROR_DOC},
    415: {"description": "not a JPEG, PNG or DICOM file (by content)", **_ERROR_DOC},
    422: {"description": "missing file, empty, corrupt, or too many pixels", **_ERROR_DOC},
}
_PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flag(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UploadError(422, f"expected true or false, got {text[:40]!r}")


def display_image(gray: np.ndarray) -> np.ndarray:
    """The decoded image at the size the service shows it: longest side at most
    :data:`DISPLAY_MAX_SIDE` (only ever shrunk), aspect kept."""
    from PIL import Image

    h, w = gray.shape
    scale = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray = np.asarray(Image.fromarray(gray, mode="L").resize(size, Image.Resampling.BICUBIC))
    return gray


def _png(gray: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Explainer:
    """The PyTorch model kept for explanations, or why there is none."""

    model: Any = None
    reason: str = ""


def _load_explainer(path: Path) -> _Explainer:
    if is_onnx_file(path):
        return _Explainer(reason="explanations need the PyTorch checkpoint (.safetensors); this "
                          "service was started with an ONNX file (serve the .safetensors with "
                          "--backend onnx to get ONNX predictions and explanations)")
    try:
        from pneumoscope.explain import cam  # noqa: F401  (grad-cam is an optional extra)
    except ModuleNotFoundError as exc:
        return _Explainer(reason=str(exc))
    from pneumoscope.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(path)
    return _Explainer(model=model)


class _Service:
    """Everything the endpoints share: the model(s), the limits, the worker limiter."""

    def __init__(self, checkpoint: str | Path, backend: Backend, max_upload_bytes: int,
                 max_pixels: int, max_concurrency: int | None, limits: ServeLimits,
                 batch_max: int = DEFAULT_BATCH_MAX, batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
                 tta: bool | None = None) -> None:
        if max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
        if max_pixels < 64:
            raise ValueError(f"max_pixels must be at least 64, got {max_pixels}")
        self.path = Path(checkpoint)
        self.predictor = Predictor(self.path, backend, max_pixels=max_pixels, tta=tta)
        self.info = self.predictor.info
        self.sha256 = _sha256(self.path)
        self.max_upload_bytes = max_upload_bytes
        self.max_pixels = max_pixels
        self.explainer = _load_explainer(self.path)
        self.dicom_available = importlib.util.find_spec("pydicom") is not None
        # Bounds the decoded images held at once (a 50-megapixel upload decodes to ~400 MB of
        # float64 on its way to uint8); the torch model is serialised by the Predictor anyway.
        self.max_concurrency = max_concurrency or max(2, len(os.sched_getaffinity(0)))
        self._limiter: anyio.CapacityLimiter | None = None
        self.limits = limits
        self.uploads = 0  # requests holding an upload slot (touched only on the event loop)
        self.batcher = Batcher(self._predict_batch, max_size=batch_max, wait_s=batch_wait_ms / 1000,
                               run_in_thread=anyio.to_thread.run_sync)

    @contextlib.asynccontextmanager
    async def upload_slot(self) -> AsyncIterator[None]:
        """One of ``limits.max_uploads`` slots for reading and working on an upload, or 503 at
        once (before any of the body is read) when they are all taken."""
        if self.uploads >= self.limits.max_uploads:
            raise UploadError(503, f"busy: {self.limits.max_uploads} uploads are in progress; retry "
                              f"in {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S),
                                                                "Connection": "close"})
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in a worker thread, at most ``max_concurrency`` at a time."""
        if self._limiter is None:  # created inside the event loop, on first use
            self._limiter = anyio.CapacityLimiter(self.max_concurrency)
        return await anyio.to_thread.run_sync(lambda: func(*args), limiter=self._limiter)

    async def read_image(self, request: Request) -> tuple[bytes, Upload]:
        """The uploaded file's bytes, checked for presence and type (not yet decoded)."""
        upload = await read_multipart(request.headers.get("content-type"),
                                      request.headers.get("content-length"), request.stream(),
                                      self.max_upload_bytes, self.limits.body_timeout_s)
        if upload.file is None:
            raise UploadError(422, "no file: send the image in a multipart field named 'file'")
        if not upload.file:
            raise UploadError(422, "the uploaded file is empty")
        kind = sniff_type(upload.file)
        if kind is None:
            raise UploadError(415, f"unsupported file type: not a {', '.join(SUPPORTED_TYPES)} "
                              "image (the type is read from the content, not the name)")
        if kind == "DICOM" and not self.dicom_available:
            raise UploadError(415, "DICOM support is not installed on this server: "
                              "pip install 'pneumoscope[dicom]'")
        return upload.file, upload

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, max_pixels=self.max_pixels, name="upload").gray

    def model_card(self) -> dict[str, Any]:
        info = self.info
        return json_safe({
            "name": info.model, "architecture": info.timm_name or info.model,
            "classes": list(info.class_names), "positive_class": info.class_names[-1],
            "threshold": info.threshold, "threshold_method": info.threshold_method,
            "metrics": {"validation": info.metrics.get("val"), "test": info.metrics.get("test")},
            "preprocessing": info.preprocessing.to_dict(),
            "model_version": info.version, "created": info.created, "sha256": self.sha256,
            "backend": self.predictor.backend, "service_version": __version__,
            "explain_methods": list(SERVICE_CAM_METHODS) if self.explainer.model is not None else [],
            "explain_unavailable_reason": self.explainer.reason or None,
            "limits": {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                       "max_aspect_ratio": MAX_ASPECT, "max_uploads": self.limits.max_uploads,
                       "body_timeout_s": self.limits.body_timeout_s,
                       "batch_max": self.batcher.max_size, "batch_wait_ms": 1000 * self.batcher.wait_s,
                       "accepted_types": list(SUPPORTED_TYPES) if self.dicom_available
                       else [t for t in SUPPORTED_TYPES if t != "DICOM"]},
            "gate": {"state": self.predictor.gate.state,
                     "levels": self.predictor.gate.levels.to_dict() if self.predictor.gate.levels else None},
            "provenance": list(info.provenance), "temperature": info.temperature,
            # Whether predictions average test-time augmentation views, and whether the
            # threshold was chosen that way (it holds only when the two agree).
            "tta": {"views": list(view_names(self.predictor.tta)),
                    "threshold_chosen_with": list(info.tta)},
            "ensemble": info.ensemble,
            "intended_use": INTENDED_USE, "limitations": list(LIMITATIONS),
        })

    def _predict_batch(self, decoded: Sequence[Any]) -> list[Any]:
        return self.predictor.predict_decoded(["upload"] * len(decoded), decoded)

    async def predict(self, data: bytes) -> dict[str, Any]:
        """The answer for one upload: decoded in a worker (its errors are its own), then
        predicted in a batch with the uploads around it (or alone with ``batch_max`` 1)."""
        def alone() -> Awaitable[Any]:
            return self.run(self.predictor.predict_bytes, data, "upload")

        if self.batcher.max_size == 1:
            return self.answer(await alone())
        return self.answer(await self.batcher.run(
            lambda: self.run(self.predictor.decode_bytes, data, "upload"), solo=alone))

    def answer(self, row: Any) -> dict[str, Any]:
        """The JSON answer for one prediction row; ``probability`` and ``label`` are null when
        the gate refuses the image (not a chest film) and ``gate`` says why."""
        if row.error:  # a non-finite probability: an error, never a label
            raise ImageDecodeError(row.error)
        reasons = [r for r in (row.gate_reason or "").split(";") if r]
        message = {"refuse": "Not a chest X-ray: no prediction is given.",
                   "warn": "This image is unlike the films the model was trained on: the probability "
                           "is unreliable.",
                   "off": "The input gate was turned off."}.get(row.gate or "", "")
        return json_safe({
            "probability": row.prob_pneumonia, "label": row.label,
            "threshold": self.predictor.threshold, "model": self.info.model,
            "gate": {"status": row.gate, "reasons": reasons,
                     "explanations": [describe_reason(r) for r in reasons],
                     "ood_score": row.ood_score, "message": message},
            "version": __version__, "backend": self.predictor.backend,
            "model_sha256": self.sha256[:16]})

    def explain(self, data: bytes, method: str, title: bool) -> tuple[Any, bytes]:
        from PIL import Image

        from pneumoscope.explain.cam import explain, explanation_title, overlay_png, title_band_height

        # The decoder refuses absurd aspect ratios (data.decode.MAX_ASPECT). Past the next three
        # lines only the model input and the display copy (longest side DISPLAY_MAX_SIDE) are
        # kept: the work and memory of the CAM and the overlay do not grow with the upload.
        decoded = decode_image(data, max_pixels=self.max_pixels, name="upload")
        model_input = resize_square(decoded.gray, self.predictor.image_size)
        shown = display_image(decoded.gray)
        # Not for an image the gate refuses: it would explain a label that is never given. The
        # gate runs before any CAM work, so a photo costs one decode and one score.
        verdict = self.predictor.gate.assess([decoded], model_input[None])[0]
        del decoded
        if verdict.status == "refuse":
            raise UploadError(422, "not a chest X-ray: "
                              + "; ".join(describe_reason(r) for r in verdict.reasons))
        expl = explain(self.explainer.model, self.info, model_input, method)
        png = overlay_png(shown, expl.heatmap, explanation_title(expl) if title else "")
        if not title:  # drop the (empty) title strip: the overlay then lines up with the preview
            img = Image.open(io.BytesIO(png))
            band = title_band_height(img.width)
            buf = io.BytesIO()
            img.crop((0, band, img.width, img.height)).save(buf, format="PNG")
            png = buf.getvalue()
        return expl, png

    def preview(self, data: bytes) -> bytes:
        from PIL import Image

        from pneumoscope.explain.cam import overlay_size, title_band_height

        gray = display_image(self.decode(data))
        # The size overlay_png gives (narrow images enlarged), without its title strip.
        w, h = overlay_size(*gray.shape)
        h -= title_band_height(w)
        if gray.shape != (h, w):
            gray = np.asarray(Image.fromarray(gray, mode="L").resize((w, h), Image.Resampling.BICUBIC))
        return _png(gray)


def _static_files() -> dict[str, bytes]:
    folder = resources.files("pneumoscope.serve") / "static"
    return {name: (folder / name).read_bytes() for name in _STATIC_FILES}


def create_app(checkpoint: str | Path, *, backend: Backend = "torch",
               max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               max_concurrency: int | None = None, limits: ServeLimits | None = None,
               allowed_hosts: Sequence[str] | None = None, batch_max: int = DEFAULT_BATCH_MAX,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, tta: bool | None = None) -> FastAPI:
    """The service for one model file (``.safetensors``, or ``.onnx`` with the onnx backend).

    The model is loaded here, once. ``max_upload_bytes``: larger uploads get 413 (counted while
    reading). ``max_pixels``: larger images (by their header) get 422 before any pixel is
    decoded. ``max_concurrency``: decode/inference jobs at once (default: the CPU cores, >= 2).
    ``limits``: upload slots and body timeout (the connection-level ones act in :func:`serve`).
    ``allowed_hosts``: ``Host`` header values accepted (others get 400; ``"*"`` any); None
    checks nothing here, for embedding and tests: :func:`serve` passes the bound names.
    ``batch_max``, ``batch_wait_ms``: dynamic batching of predictions (see the module text).
    ``tta``: test-time augmentation (torch backend only; ``None`` follows the model file, see
    :class:`~pneumoscope.serve.predict.Predictor`); ``/v1/model`` shows it under ``tta``.
    """
    service = _Service(checkpoint, backend, max_upload_bytes, max_pixels, max_concurrency,
                       limits or ServeLimits(), batch_max, batch_wait_ms, tta)
    static = _static_files()
    app = FastAPI(
        title="PneumoScope",
        version=__version__,
        description=("Pneumonia probability and heatmaps for chest X-rays (JPEG, PNG, DICOM). "
                     "**Research use only — not a medical device.**"),
    )
    app.state.service = service
    if allowed_hosts is not None:  # DNS rebinding: a page elsewhere must not reach this API
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)

    @app.exception_handler(UploadError)
    async def _upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody is left to answer: one line, no traceback (the response below goes nowhere).
        log.info("client %s disconnected during the upload to %s; request dropped",
                 request.client.host if request.client else "?", request.url.path)
        return Response(status_code=400)

    @app.exception_handler(ImageDecodeError)
    async def _decode_error(_: Request, exc: ImageDecodeError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path.startswith("/v1/"):  # results about a patient's image: never cached
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness: answers from the event loop, even while the workers are busy."""
        return {"status": "ok", "model": service.info.model, "backend": service.predictor.backend,
                "uploads_in_progress": service.uploads,
                "batches": {"run": service.batcher.batches, "requests": service.batcher.items,
                            "alone": service.batcher.solo}}

    @app.get("/v1/model", tags=["model"])
    async def model_card() -> JSONResponse:
        """Model card: classes, threshold, metrics from the checkpoint, preprocessing, limits,
        intended use and limitations."""
        return JSONResponse(service.model_card())

    @app.post("/v1/predict", tags=["model"], openapi_extra=_UPLOAD_DOC, responses=_ERRORS)
    async def predict(request: Request) -> JSONResponse:
        """Probability of pneumonia for one image, and the label at the model's threshold.
        ``latency_ms``: decoding and inference on the server (queueing for a worker included)."""
        async with service.upload_slot():
            data, _ = await service.read_image(request)
            start = time.perf_counter()
            result = await service.predict(data)
        result["latency_ms"] = round(1000 * (time.perf_counter() - start), 2)
        return JSONResponse(result)

    @app.post("/v1/explain", tags=["model"], openapi_extra=_EXPLAIN_DOC,
              responses={**_ERRORS, **_PNG, 501: {"description": "no PyTorch model for CAMs", **_ERROR_DOC}})
    async def explain(request: Request) -> Response:
        """Heatmap overlay PNG (Grad-CAM by default) of the pneumonia output; ``X-Probability``,
        ``X-Label``, ``X-Threshold``, ``X-Method`` headers. Fields may also be query parameters."""
        if service.explainer.model is None:
            return _error(501, service.explainer.reason)
        async with service.upload_slot():
            data, upload = await service.read_image(request)
            fields = {**request.query_params, **upload.fields}
            method = (fields.get("method") or "gradcam").strip().lower()
            if method not in SERVICE_CAM_METHODS:
                raise UploadError(422, f"unknown or unavailable CAM method {method[:40]!r}; choose "
                                  f"from {', '.join(SERVICE_CAM_METHODS)}")
            title = _flag(fields.get("title"), True)
            start = time.perf_counter()
            expl, png = await service.run(service.explain, data, method, title)
        return Response(png, media_type="image/png", headers={
            "X-Probability": f"{expl.probability:.6f}", "X-Label": expl.label,
            "X-Threshold": f"{expl.threshold:.6f}", "X-Method": method, "X-Model": service.info.model,
            "X-Latency-Ms": f"{1000 * (time.perf_counter() - start):.2f}"})

    @app.post("/v1/preview", tags=["model"], openapi_extra=_UPLOAD_DOC, responses={**_ERRORS, **_PNG})
    async def preview(request: Request) -> Response:
        """The decoded grayscale image as PNG (DICOM windowed, EXIF orientation applied), at the
        size of an overlay without title: what the model is given, before its square resize."""
        async with service.upload_slot():
            data, _ = await service.read_image(request)
            png = await service.run(service.preview, data)
        return Response(png, media_type="image/png")

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(static["index.html"], headers={"Content-Security-Policy": _PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static or name == "index.html":
            return _error(404, "not found")
        return Response(static[name], media_type=_STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    log.info("serving %s (%s backend, threshold %.3f, tta %s, uploads up to %d bytes, %d pixels)",
             service.path, service.predictor.backend, service.info.threshold,
             "on" if service.predictor.tta else "off", max_upload_bytes, max_pixels)
    return app


def _h11_with_header_timeout(timeout: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for a request's line and headers (uvicorn has
    none: a client trickling header bytes held its connection for ever). Armed when a
    connection opens and after each response; a request that has begun by then is left alone
    (its body has ``body_timeout_s``; an idle connection, uvicorn's keep-alive timeout)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Protocol(H11Protocol):
        _header_timer: Any = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout, self._expire, self.cycle)

        def _expire(self, cycle_then: Any) -> None:
            waiting = cycle_then is None or cycle_then.response_complete  # no request under way
            if self.cycle is cycle_then and waiting and not self.transport.is_closing():
                log.info("closed a connection from %s: no complete request headers within %g s",
                         self.client[0] if self.client else "?", timeout)
                if self.conn.our_state in (h11.IDLE, h11.DONE):
                    with contextlib.suppress(h11.LocalProtocolError):
                        self.conn.send(h11.ConnectionClosed())
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return _Protocol


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 8000, backend: Backend = "torch",
          max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
          limits: ServeLimits | None = None, allowed_hosts: Sequence[str] | None = None,
          on_ready: Callable[[str], None] | None = None, batch_max: int = DEFAULT_BATCH_MAX,
          batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, tta: bool | None = None) -> None:
    """Create the app and run it with uvicorn until interrupted. ``on_ready(url)`` is called
    once the model is loaded, before the server starts listening. ``allowed_hosts``: default
    :func:`default_allowed_hosts` of ``host``."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ModuleNotFoundError(f"the web service needs uvicorn; {SERVE_INSTALL_HINT}") from exc
    limits = limits or ServeLimits()
    hosts = list(allowed_hosts) if allowed_hosts is not None else default_allowed_hosts(host)
    if not hosts:
        raise ValueError("allowed_hosts is empty: no request could be answered (use '*' for any)")
    if host in ("0.0.0.0", "::") and allowed_hosts is None:
        log.warning("listening on %s, but only requests addressed to %s are answered: name the "
                    "server's host names with --allowed-hosts", host, ", ".join(hosts))
    app = create_app(checkpoint, backend=backend, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                     limits=limits, allowed_hosts=hosts, batch_max=batch_max, batch_wait_ms=batch_wait_ms,
                     tta=tta)
    if on_ready is not None:
        shown = f"[{host}]" if ":" in host else host
        on_ready(f"http://{shown}:{port}/")
    # One process: the model is loaded once and shared; workers are threads (see _Service.run).
    uvicorn.run(app, host=host, port=port, log_level="info", **uvicorn_options(limits))


def uvicorn_options(limits: ServeLimits) -> dict[str, Any]:
    """The uvicorn settings that enforce the connection-level ``limits`` (h11 with a header
    deadline, ``limit_concurrency``, ``timeout_keep_alive``, the header size)."""
    return {"http": _h11_with_header_timeout(limits.header_timeout_s),
            "limit_concurrency": limits.max_connections, "timeout_keep_alive": limits.keep_alive_s,
            "h11_max_incomplete_event_size": limits.max_header_bytes}


__all__ = ["DEFAULT_BATCH_MAX", "DEFAULT_BATCH_WAIT_MS", "DEFAULT_MAX_UPLOAD_BYTES", "LOOPBACK_HOSTS",
           "SERVICE_CAM_METHODS", "ServeLimits", "create_app", "default_allowed_hosts", "display_image",
           "serve", "uvicorn_options"]
