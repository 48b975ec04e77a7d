"""Images the gate is designed and tested on: near-OOD chest films and synthetic non-chest images.

The OOD corpus in ``../shared/data/ood`` is for measuring only, so every design choice of the
gate is made on validation films, on the near-OOD transforms of them below, and on the
synthetic non-chest images made here. All are deterministic given their inputs and ``rng``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

NEAR_OOD_EXPECTED: dict[str, str] = {
    "hflip": "ok: a mirrored film is still a frontal chest film",
    "crop": "warn or refuse: a quarter of the film, enlarged, is unlike any training film",
    "squeeze": "warn or refuse: a narrow chest padded to a square, the shape of a lateral view",
    "rot180": "warn or refuse: upside down",
    "rot90": "refuse: a film on its side",
    "invert": "warn at least: a negative (MONOCHROME1 read the wrong way round); generic features "
              "keep its edges, so on validation most inverted films crossed warn and none was refused",
}
"""What the gate should say about each :func:`near_ood` transform, and why."""


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    pil = Image.fromarray(img, mode="L").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8)


def _crop(img: np.ndarray) -> np.ndarray:
    # The central half of each side: a quarter of the film (heart and hila), enlarged.
    h, w = img.shape
    return _resize(img[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2], w, h)


def _squeeze(img: np.ndarray) -> np.ndarray:
    # Half the width, centred on a background of the film's own border level.
    h, w = img.shape
    narrow = _resize(img, max(1, w // 2), h)
    border = np.concatenate([img[:, 0], img[:, -1]])
    out = np.full_like(img, int(np.median(border)))
    left = (w - narrow.shape[1]) // 2
    out[:, left : left + narrow.shape[1]] = narrow
    return out


NEAR_OOD: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hflip": lambda img: img[:, ::-1],
    "crop": _crop,
    "squeeze": _squeeze,
    "rot180": lambda img: img[::-1, ::-1],
    "rot90": lambda img: np.rot90(img),
    "invert": lambda img: 255 - img,
}


def near_ood(images: np.ndarray, name: str) -> np.ndarray:
    """``images`` (uint8, (N, S, S)) after the near-OOD transform ``name`` (see
    :data:`NEAR_OOD_EXPECTED`); same shape and dtype."""
    if name not in NEAR_OOD:
        raise ValueError(f"unknown near-OOD transform {name!r}; expected one of {sorted(NEAR_OOD)}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"near_ood expects uint8 (N, S, S) images, got {images.dtype} {images.shape}")
    return np.stack([np.ascontiguousarray(NEAR_OOD[name](img)) for img in images])


# --- synthetic non-chest images ---------------------------------------------------------------


def _colour_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    # Smooth colour blobs: low-resolution random colours, enlarged (photo-like colour fields).
    cells = int(rng.integers(3, 9))
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC))


def _text(rng: np.random.Generator, size: int) -> np.ndarray:
    # A page of dark text lines on light paper (documents, screenshots).
    img = Image.new("L", (size, size), int(rng.integers(215, 256)))
    draw = ImageDraw.Draw(img)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz      "))
    step = int(rng.integers(8, 14))
    for y in range(int(rng.integers(2, 8)), size - step, step):
        line = "".join(rng.choice(letters, size // 4))
        draw.text((int(rng.integers(1, 6)), y), line, fill=int(rng.integers(0, 60)))
    return np.asarray(img, dtype=np.uint8)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    lo, hi = sorted(rng.uniform(0, 255, 2))
    return np.round(lo + ramp * (hi - lo)).astype(np.uint8)


def _checkerboard(rng: np.random.Generator, size: int) -> np.ndarray:
    cell = int(rng.integers(2, max(3, size // 4)))
    yy, xx = np.mgrid[0:size, 0:size] // cell
    dark, light = sorted(rng.integers(0, 256, 2))
    return np.where((yy + xx) % 2 == 0, dark, light).astype(np.uint8)


def _grey_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def _shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    # Flat rectangles and ellipses (diagrams, icons).
    img = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(4, size // 2 + 5), y0 + rng.integers(4, size // 2 + 5)
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((int(x0), int(y0), int(x1), int(y1)), fill=int(rng.integers(0, 256)))
    return np.asarray(img, dtype=np.uint8)


def _limb(rng: np.random.Generator, size: int) -> np.ndarray:
    # A radiograph of something else: on a dark background, a band of soft tissue holding one
    # to three bright bone shafts with denser cortical edges (a forearm, a finger), at any angle.
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size * 2.0 - 1.0
    angle = rng.uniform(0, np.pi)
    across = np.cos(angle) * xx + np.sin(angle) * yy  # distance across the limb
    along = -np.sin(angle) * xx + np.cos(angle) * yy
    width = rng.uniform(0.25, 0.6)
    img = np.full((size, size), rng.uniform(0.02, 0.12))
    img += rng.uniform(0.25, 0.4) / (1.0 + np.exp((np.abs(across) - width) / 0.03))
    n_bones = int(rng.integers(1, 4))
    for centre in np.linspace(-0.5, 0.5, n_bones) * width if n_bones > 1 else [0.0]:
        radius = rng.uniform(0.3, 0.6) * width / n_bones
        end = rng.uniform(0.3, 1.2)  # where the shaft stops (a joint, or off the image)
        inside = np.clip(1.0 - np.abs(across - centre) / radius, 0.0, 1.0)
        cortex = np.exp(-0.5 * ((np.abs(across - centre) - 0.8 * radius) / (0.15 * radius)) ** 2)
        shaft = (0.3 * np.sqrt(inside) + 0.25 * cortex) / (1.0 + np.exp((along - end) / 0.02))
        img += shaft * rng.uniform(0.8, 1.2)
    img = img + rng.normal(0.0, 0.015, img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


SYNTHETIC_KINDS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "colour": _colour_noise,
    "text": _text,
    "gradient": _gradient,
    "checkerboard": _checkerboard,
    "grey_noise": _grey_noise,
    "shapes": _shapes,
    "limb": _limb,
}
"""Generators of synthetic non-chest images; ``colour`` gives (S, S, 3) RGB, the rest (S, S)."""


def synthetic_non_chest(rng: np.random.Generator, kind: str, n: int, size: int) -> list[np.ndarray]:
    """``n`` synthetic non-chest images of ``kind`` (:data:`SYNTHETIC_KINDS`), uint8, ``size``
    pixels a side."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {sorted(SYNTHETIC_KINDS)}")
    return [SYNTHETIC_KINDS[kind](rng, size) for _ in range(n)]
