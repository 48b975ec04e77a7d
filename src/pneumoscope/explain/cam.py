"""Class activation maps through pytorch-grad-cam: heatmaps, overlays and a faithfulness check.

Every method explains the **pneumonia logit** (the model's single output). For an image the model
calls NORMAL the map is still the one of the pneumonia logit: it shows where the (weak) evidence
*for* pneumonia sits, which may be nothing at all (an all-zero map after the ReLU). There is no
separate "NORMAL" map to show: a one-logit model has no evidence for NORMAL other than the
absence of evidence for pneumonia.

Heatmaps are min-max scaled per image (pytorch-grad-cam's ``scale_cam_image``): they say where,
relative to the rest of that image, not how much, and are not comparable between images.

A deep ensemble (:class:`~pneumoscope.models.ensemble.EnsembleClassifier`) is explained member by
member: the method runs on each member's own CAM layer (explaining that member's logit), and the
ensemble's map is the mean of the members' scaled maps (in [0, 1], not scaled again); the
probability reported is the ensemble's.

The CAM objects hook into the model. :func:`explain` and :func:`faithfulness` release every hook
and restore the modules' train/eval flags, ``requires_grad`` flags and ``.grad`` tensors before
they return, even on errors. Explanations of one process are serialised by a lock; a model that
other threads run forward passes on at the same time must not be explained (use a copy).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pneumoscope import CLASS_NAMES
from pneumoscope.data.datasets import to_model_input
from pneumoscope.data.decode import load_grayscale, resize_square
from pneumoscope.data.inputs import scan_inputs
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint
from pneumoscope.models.ensemble import Classifier, EnsembleClassifier
from pneumoscope.models.factory import XrayClassifier
from pneumoscope.models.registry import ModelSpec, get_spec, list_specs

try:
    import pytorch_grad_cam as _pgc
    from pytorch_grad_cam.ablation_layer import AblationLayer, AblationLayerVit
    from pytorch_grad_cam.base_cam import BaseCAM
    from pytorch_grad_cam.metrics.road import ROADLeastRelevantFirst, ROADMostRelevantFirst
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError as exc:  # an optional extra: say how to get it
    raise ModuleNotFoundError(
        f"explanations need pytorch-grad-cam ({exc}); install them with "
        "`pip install 'pneumoscope[explain]'` (or `pip install grad-cam matplotlib`)") from exc

log = logging.getLogger(__name__)

CAM_METHODS: dict[str, type[BaseCAM]] = {
    "gradcam": _pgc.GradCAM,
    "gradcam++": _pgc.GradCAMPlusPlus,
    "xgradcam": _pgc.XGradCAM,
    "hirescam": _pgc.HiResCAM,
    "layercam": _pgc.LayerCAM,
    "eigencam": _pgc.EigenCAM,
    "eigengradcam": _pgc.EigenGradCAM,
    "scorecam": _pgc.ScoreCAM,
    "ablationcam": _pgc.AblationCAM,
}
"""Method name (command line, API) → pytorch-grad-cam class. ``scorecam`` and ``ablationcam``
run one forward pass per channel of the CAM layer (512-2048 passes): minutes per image on CPU,
and the library draws its own progress bar for each image (it has no option to turn it off)."""

GRADIENT_FREE: frozenset[str] = frozenset({"eigencam", "scorecam", "ablationcam"})
"""Methods that need no backward pass."""

# One explanation at a time per process: CAM hooks on a shared model must not interleave.
_LOCK = threading.RLock()


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Explanation:
    """One image explained by one method."""

    heatmap: np.ndarray
    """float32 (S, S) in [0, 1], S = the model's input size; relative to this image only."""
    probability: float
    """P(pneumonia) = sigmoid of the logit that the map explains."""
    label: str
    """Predicted class at ``threshold``."""
    method: str
    threshold: float = 0.5


# --- layers and reshapes ---------------------------------------------------------------------


def resolve_spec(model: Classifier,
                 info_or_spec_name: CheckpointInfo | ModelSpec | str | None = None) -> ModelSpec:
    """The registry spec of ``model``: from a checkpoint's info, a spec, a registry name, or
    (``None``) inferred from the timm architecture of the backbone."""
    if isinstance(info_or_spec_name, ModelSpec):
        return info_or_spec_name
    if isinstance(info_or_spec_name, CheckpointInfo):
        return get_spec(info_or_spec_name.model)
    if isinstance(info_or_spec_name, str):
        return get_spec(info_or_spec_name)
    arch = model.timm_name
    matches = [s for s in list_specs() if s.timm_name.split(".")[0] == arch]
    if len(matches) != 1:
        raise ValueError(f"cannot tell the registry model of a '{arch}' backbone: pass its name")
    return matches[0]


def target_layer(model: XrayClassifier, spec_name: ModelSpec | str) -> nn.Module:
    """The backbone module the spec's ``cam_layer`` names (looked up by name, never evaluated)."""
    spec = spec_name if isinstance(spec_name, ModelSpec) else get_spec(spec_name)
    if isinstance(model, EnsembleClassifier):
        raise ValueError(f"a deep ensemble has one CAM layer per member ({len(model)}): use heatmaps() "
                         "or explain(), which average the members' maps, or pass one of model.members")
    modules = dict(model.backbone.named_modules())
    if spec.cam_layer not in modules:
        # Show the last few top-level-ish names: the usual candidates for a CAM layer.
        names = [n for n in modules if n and n.count(".") <= 1][-8:]
        raise ValueError(f"model '{spec.name}' has no module {spec.cam_layer!r} for CAM; "
                         f"some of its modules: {', '.join(names)}")
    return modules[spec.cam_layer]


def vit_reshape(tokens: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (N, prefix + gh*gw, C) → a CNN-like (N, C, gh, gw) map, prefix (class and
    register) tokens dropped."""
    n, length, channels = tokens.shape
    gh, gw = grid
    if length - num_prefix_tokens != gh * gw:
        raise ValueError(f"{length} tokens do not make {num_prefix_tokens} prefix tokens plus a "
                         f"{gh}x{gw} grid")
    return tokens[:, num_prefix_tokens:].reshape(n, gh, gw, channels).permute(0, 3, 1, 2)


def reshape_transform(model: XrayClassifier, spec: ModelSpec,
                      input_size: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The reshape a spec needs (``None`` for CNNs); the ViT grid follows from the input size
    and the patch size, so it is right at any ``image_size``."""
    if spec.reshape is None:
        return None
    if spec.reshape != "vit":
        raise ValueError(f"unknown CAM reshape {spec.reshape!r} for model '{spec.name}'")
    backbone = model.backbone
    ph, pw = backbone.patch_embed.patch_size
    grid = (input_size[0] // ph, input_size[1] // pw)
    return functools.partial(vit_reshape, num_prefix_tokens=int(backbone.num_prefix_tokens), grid=grid)


# --- the CAM session -------------------------------------------------------------------------


class _PneumoniaProbability:
    """Target: sigmoid of the single logit. AblationCAM divides by the original score, which
    only makes sense for a positive score (a logit can be negative or zero)."""

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(model_output[..., 0])


def _targets(method: str, n: int) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    if method == "ablationcam":
        return [_PneumoniaProbability() for _ in range(n)]
    return [ClassifierOutputTarget(0) for _ in range(n)]


def _check_method(method: str) -> str:
    name = method.strip().lower()
    if name not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    return name


@contextlib.contextmanager
def cam_session(model: XrayClassifier, spec: ModelSpec, method: str,
                input_size: tuple[int, int]) -> Iterator[BaseCAM]:
    """A pytorch-grad-cam object hooked into ``model``; on exit the hooks are released and the
    model is put back as it was (train/eval flags, ``requires_grad``, ``.grad``, and the CAM
    layer, which AblationCAM swaps out while it runs)."""
    method = _check_method(method)
    layer = target_layer(model, spec)
    parents = dict(model.backbone.named_modules())
    parent_name, _, child_name = spec.cam_layer.rpartition(".")
    kwargs: dict[str, Any] = {"reshape_transform": reshape_transform(model, spec, input_size)}
    if method == "ablationcam":
        # A fresh ablation layer each time: the library's default argument is one shared instance.
        kwargs["ablation_layer"] = AblationLayerVit() if spec.reshape == "vit" else AblationLayer()
    with _LOCK:  # the snapshot too: another session must not be midway when it is taken
        modes = [(m, m.training) for m in model.modules()]
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        cam = None
        try:
            # Gradients reach the CAM layer through the input (which requires grad): no weight
            # gradients are computed or accumulated, and frozen layers need no unfreezing.
            for p in params:
                p.requires_grad_(False)
            cam = CAM_METHODS[method](model, [layer], **kwargs)
            if method == "scorecam":
                cam.batch_size = 32
            yield cam
        finally:
            if cam is not None:
                cam.activations_and_grads.release()
            if getattr(parents[parent_name], child_name) is not layer:  # an interrupted AblationCAM
                setattr(parents[parent_name], child_name, layer)
            for p, flag, grad in zip(params, flags, grads, strict=True):
                p.requires_grad_(flag)
                p.grad = grad
            for m, training in modes:
                m.training = training


def _cams(cam: BaseCAM, x: torch.Tensor, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) float32 in [0, 1] and logits (N,) for a batch."""
    x = x.detach().clone().requires_grad_(method not in GRADIENT_FREE)
    heat = cam(input_tensor=x, targets=_targets(method, len(x)))
    logits = cam.outputs.detach().float().reshape(len(x), -1)[:, 0].cpu().numpy()
    # Min-max scaling divides by max + 1e-7: an all-zero map stays zero, but guard anyway.
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return heat, logits


def _heat_and_logits(model: Classifier, spec: ModelSpec, method: str, x_all: torch.Tensor,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, S, S) and logits (N,) of a batch of model inputs; for an ensemble, the mean of
    its members' maps (each on its own CAM layer) and the ensemble's logits."""
    size = model.preprocessing.image_size
    if isinstance(model, EnsembleClassifier):
        heat = np.mean([_heat_and_logits(member, spec, method, x_all, batch_size)[0]
                        for member in model.members], axis=0, dtype=np.float32)
        with torch.no_grad():
            logits = torch.cat([model(x_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size)])
        return heat, logits.float().reshape(len(x_all), -1)[:, 0].cpu().numpy()
    with cam_session(model, spec, method, (size, size)) as cam:
        parts = [_cams(cam, x_all[i:i + batch_size], method) for i in range(0, len(x_all), batch_size)]
    return np.concatenate([h for h, _ in parts]), np.concatenate([lg for _, lg in parts])


def heatmaps(model: Classifier, info_or_spec_name: CheckpointInfo | ModelSpec | str | None,
             images: np.ndarray, method: str = "gradcam", batch_size: int = 16) -> np.ndarray:
    """Heatmaps (N, S, S) float32 in [0, 1] of uint8 images (N, S, S) already at the model's
    size, in batches: what :func:`explain` computes one image at a time, much faster on a CPU."""
    method = _check_method(method)
    spec = resolve_spec(model, info_or_spec_name)
    x_all = to_model_input(np.asarray(images)).to(next(model.parameters()).device)
    return _heat_and_logits(model, spec, method, x_all, batch_size)[0]


def _as_input(image: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (H, W) (any size: resized like every other path) or float (1, 1, S, S) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[:2] != (1, 1) or tuple(image.shape[2:]) != (size, size):
            raise ValueError(f"expected a tensor of shape (1, 1, {size}, {size}), got "
                             f"{tuple(image.shape)}")
        return image.float()
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 grayscale (H, W) array, got {image.dtype} {image.shape}")
    return to_model_input(resize_square(image, size))


def explain(model: Classifier, info_or_spec_name: CheckpointInfo | ModelSpec | str | None,
            image: np.ndarray | torch.Tensor, method: str = "gradcam") -> Explanation:
    """Explain the pneumonia logit of one image with one CAM method.

    ``info_or_spec_name``: a checkpoint's :class:`CheckpointInfo` (its threshold and class names
    are used), a registry name or spec (threshold 0.5), or ``None`` (spec inferred). ``image``:
    uint8 grayscale (H, W), resized to the model's size, or float (1, 1, S, S) in [0, 1].
    """
    spec = resolve_spec(model, info_or_spec_name)
    info = info_or_spec_name if isinstance(info_or_spec_name, CheckpointInfo) else None
    threshold = info.threshold if info else 0.5
    class_names = info.class_names if info else CLASS_NAMES
    size = model.preprocessing.image_size
    x = _as_input(image, size).to(next(model.parameters()).device)
    method = _check_method(method)
    heat, logits = _heat_and_logits(model, spec, method, x, 1)
    probability = float(torch.sigmoid(torch.tensor(logits[0])))
    label = class_names[1] if probability >= threshold else class_names[0]
    return Explanation(heat[0], probability, label, method, threshold)


# --- pictures --------------------------------------------------------------------------------


MAX_OVERLAY_SIDE = 1024
"""Longest side, in pixels, of the image part of any overlay: a narrow image is enlarged for
legibility only up to this, and a larger one is shrunk to it, so an overlay's cost does not
depend on the upload's size or shape."""


def title_band_height(width: int) -> int:
    """Height in pixels of the title strip :func:`overlay_png` puts above a ``width``-wide image."""
    return max(16, width // 12)


def overlay_size(height: int, width: int, min_width: int = 256) -> tuple[int, int]:
    """(width, height) of the PNG :func:`overlay_png` makes from an ``height x width`` image:
    enlarged to at least ``min_width`` wide, but the image part never longer than
    :data:`MAX_OVERLAY_SIDE` on either side (aspect kept)."""
    scale = min(max(1.0, min_width / width), MAX_OVERLAY_SIDE / max(height, width))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return w, h + title_band_height(w)


def overlay_png(image_uint8: np.ndarray, heatmap: np.ndarray, title: str = "", *,
                alpha: float = 0.4, colormap: str = "jet", min_width: int = 256) -> bytes:
    """PNG bytes: the X-ray in gray with the heatmap blended in (``alpha``), under a title strip.

    The heatmap is resized to the image (bilinear). Images narrower than ``min_width`` are
    enlarged (bicubic) so that a 224-px model input stays legible with its title; the size is
    :func:`overlay_size` (bounded by :data:`MAX_OVERLAY_SIDE`). Everything is built in uint8 at
    that size (a few bytes per output pixel), whatever the size of ``image_uint8``.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError("overlays need matplotlib: `pip install 'pneumoscope[explain]'`") from exc
    import io

    from PIL import Image, ImageDraw, ImageFont

    gray = np.asarray(image_uint8)
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a uint8 grayscale (H, W) image, got {gray.dtype} {gray.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    out_w, out_h = overlay_size(*gray.shape, min_width=min_width)
    band = title_band_height(out_w)
    h, w = out_h - band, out_w
    base = Image.fromarray(gray, mode="L")
    if gray.shape != (h, w):
        base = base.resize((w, h), Image.Resampling.BICUBIC)
    heat = Image.fromarray(np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0),
                           mode="F")
    if heat.size != (w, h):
        heat = heat.resize((w, h), Image.Resampling.BILINEAR)
    # The colour map as a 256-entry uint8 table (no pyplot, no backend): the heat, quantised to
    # 8 bits like the PNG it ends up in, indexes it.
    lut = matplotlib.colormaps[colormap](np.linspace(0.0, 1.0, 256), bytes=True)[:, :3]
    index = np.round(np.clip(np.asarray(heat), 0.0, 1.0) * 255.0).astype(np.uint8)
    colors = Image.fromarray(lut[index], mode="RGB")
    canvas = Image.new("RGB", (out_w, out_h), (0, 0, 0))
    canvas.paste(Image.blend(base.convert("RGB"), colors, alpha), (0, band))
    if title:
        draw = ImageDraw.Draw(canvas)
        size = max(6, int(band * 0.6))
        font = ImageFont.load_default(size=size)
        while size > 6 and draw.textlength(title, font=font) > out_w - 6:  # shrink to fit
            size -= 1
            font = ImageFont.load_default(size=size)
        draw.text((3, band // 2), title, fill=(255, 255, 255), font=font, anchor="lm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def explanation_title(expl: Explanation) -> str:
    """``"gradcam: PNEUMONIA, p=0.93 (threshold 0.41)"``."""
    return f"{expl.method}: {expl.label}, p={expl.probability:.2f} (threshold {expl.threshold:.2f})"


# --- many files ------------------------------------------------------------------------------


def _unique_stem(path: Path, used: set[str]) -> str:
    # Kermany reuses file names across splits and classes: never overwrite an earlier output.
    stem, i = path.stem, 2
    while stem in used:
        stem, i = f"{path.stem}-{i}", i + 1
    used.add(stem)
    return stem


def explain_files(checkpoint: str | Path, paths: Iterable[str | Path], out_dir: str | Path,
                  methods: Sequence[str] = ("gradcam",), progress: bool = True) -> list[dict[str, Any]]:
    """Write ``<stem>_<method>.png`` (overlay) and ``<stem>_<method>.npy`` (heatmap, float32 at the
    model's input size) for every image (folders: recursive) and method into ``out_dir``.

    Returns one dict per image: ``path``, ``probability``, ``label``, ``outputs`` (method →
    ``{"png", "npy"}``) and ``error`` (``None``, or why the file was skipped: a bad file is
    logged and skipped, not fatal).
    """
    methods = [_check_method(m) for m in methods]
    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = scan_inputs(list(paths)).entries
    used: set[str] = set()
    results: list[dict[str, Any]] = []
    for entry in tqdm(entries, desc="explain", unit="img", disable=not progress):
        path = entry.path
        row: dict[str, Any] = {"path": str(path), "probability": None, "label": None,
                               "outputs": {}, "error": None}
        results.append(row)
        if entry.error is not None:  # missing, a broken link, a FIFO...: never opened
            log.warning("skipped %s: %s", path, entry.error)
            row["error"] = f"{path}: {entry.error}"
            continue
        try:
            gray = load_grayscale(path)
            image = resize_square(gray, size)
            stem = _unique_stem(path, used)
            for method in methods:
                expl = explain(model, info, image, method)
                png, npy = out / f"{stem}_{method}.png", out / f"{stem}_{method}.npy"
                png.write_bytes(overlay_png(image, expl.heatmap, explanation_title(expl)))
                np.save(npy, expl.heatmap)
                row.update(probability=expl.probability, label=expl.label)
                row["outputs"][method] = {"png": str(png), "npy": str(npy)}
        except (ValueError, OSError) as exc:  # ImageDecodeError is a ValueError
            log.warning("skipped %s: %s", path, exc)
            row["error"] = str(exc)
    return results


# --- faithfulness ----------------------------------------------------------------------------


def _rank_map(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Heatmap → its pixel ranks scaled to [0, 1), ties broken at random. ROAD removes pixels by
    percentile of the map; with the many tied zeros of a ReLU'd CAM, "the least relevant 10%"
    would otherwise remove far more (or less) than 10%."""
    flat = heat.ravel()
    order = np.lexsort((rng.random(flat.size), flat))
    ranks = np.empty(flat.size, dtype=np.float32)
    ranks[order] = np.arange(flat.size, dtype=np.float32) / flat.size
    return ranks.reshape(heat.shape)


def faithfulness(model: Classifier, images: np.ndarray, method: str = "gradcam",
                 percentiles: Sequence[int] = (10, 20, 50), *,
                 spec: CheckpointInfo | ModelSpec | str | None = None, seed: int = 0,
                 batch_size: int = 8) -> dict[str, Any]:
    """How much the pneumonia logit drops when the X% most relevant pixels of the map are removed,
    against when the X% least relevant are, with ROAD (pytorch-grad-cam's ``metrics.road``:
    removed pixels are filled in by noisy linear imputation from their neighbours, so the model
    sees no sharp mask edges).

    A faithful map hurts more when its most relevant pixels go: ``gap[X] = most[X] - least[X]``
    should be positive. Returns ``method``, ``n``, ``score`` (what the drops are measured on),
    ``percentiles``, ``most_relevant_removed``, ``least_relevant_removed``, ``gap`` (each
    percentile → mean drop over the images, in logits; positive = the score went down) and
    ``faithful`` (mean gap > 0).
    """
    method = _check_method(method)
    spec_ = resolve_spec(model, spec)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, S, S), got {images.dtype} {images.shape}")
    if not percentiles or any(not 0 < p < 100 for p in percentiles):
        raise ValueError(f"percentiles must be in (0, 100), got {list(percentiles)}")
    size = model.preprocessing.image_size
    device = next(model.parameters()).device
    x_all = to_model_input(np.stack([resize_square(im, size) for im in images])).to(device)
    rng = np.random.default_rng(seed)
    most: dict[int, list[float]] = {int(p): [] for p in percentiles}
    least: dict[int, list[float]] = {int(p): [] for p in percentiles}
    heat = heatmaps(model, spec_, np.stack([resize_square(im, size) for im in images]), method,
                    batch_size)
    ranks = np.stack([_rank_map(h, rng) for h in heat])
    targets = [ClassifierOutputTarget(0) for _ in range(len(x_all))]
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        # The imputer adds torch noise: a fixed seed, without touching the caller's RNG state.
        with torch.random.fork_rng(devices=[]), torch.no_grad(), warnings.catch_warnings():
            torch.manual_seed(seed)
            # The ROAD imputer hands torch tensors to np.argwhere: numpy 2 warns, results are right.
            warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
            for p in most:
                # ROAD keeps the pixels below the given percentile of the map: remove the top p%
                # with percentile 100 - p; LeRF does it on 1 - map, removing the bottom p%.
                morf_metric = ROADMostRelevantFirst(percentile=100 - p)
                lerf_metric = ROADLeastRelevantFirst(percentile=100 - p)
                for i in range(0, len(x_all), batch_size):
                    x, r, t = x_all[i:i + batch_size], ranks[i:i + batch_size], targets[i:i + batch_size]
                    # The metric returns score_after - score_before; a drop is its negative.
                    most[p] += (-np.asarray(morf_metric(x, r, t, model), dtype=np.float64).ravel()).tolist()
                    least[p] += (-np.asarray(lerf_metric(x, r, t, model), dtype=np.float64).ravel()).tolist()
    finally:
        for m, training in was_training:
            m.training = training
    mean_most = {p: float(np.mean(v)) for p, v in most.items()}
    mean_least = {p: float(np.mean(v)) for p, v in least.items()}
    gap = {p: mean_most[p] - mean_least[p] for p in mean_most}
    return {"method": method, "n": len(images), "score": "pneumonia logit",
            "percentiles": [int(p) for p in percentiles],
            "most_relevant_removed": mean_most, "least_relevant_removed": mean_least,
            "gap": gap, "faithful": bool(np.mean(list(gap.values())) > 0)}


def faithfulness_of_files(checkpoint: str | Path, paths: Sequence[str | Path],
                          methods: Sequence[str] = ("gradcam",)) -> list[dict[str, Any]]:
    """:func:`faithfulness` of each method over image files, decoded and resized as every other
    path does; an empty list when there are no files."""
    model, info = load_checkpoint(checkpoint)
    size = info.preprocessing.image_size
    images = [resize_square(load_grayscale(p), size) for p in paths]
    if not images:
        return []
    return [faithfulness(model, np.stack(images), m, spec=info) for m in methods]


def format_faithfulness(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of :func:`faithfulness` results, one line per method."""
    if not rows:
        return ""
    ps = rows[0]["percentiles"]
    head = f"{'method':<14}" + "".join(f"  most{p:>3}%  least{p:>3}%" for p in ps) + "  faithful"
    lines = [f"logit drop when the most / least relevant pixels are removed (ROAD, n={rows[0]['n']})",
             head]
    for r in rows:
        cells = "".join(f"  {r['most_relevant_removed'][p]:>8.3f}  {r['least_relevant_removed'][p]:>9.3f}"
                        for p in ps)
        lines.append(f"{r['method']:<14}{cells}  {'yes' if r['faithful'] else 'NO'}")
    return "\n".join(lines)
