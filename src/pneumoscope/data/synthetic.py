"""Synthetic chest-X-ray phantoms and fake datasets on disk, for tests and demos.

The repository ships no patient images, so every test that needs pixels uses these phantoms:
a body ellipse with two dark lung fields, ribs, spine and heart shadow; PNEUMONIA phantoms add
patchy, cloudy opacities inside the lungs. Per-image jitter (position, scale, brightness,
contrast, rib spacing, benign nodules in some normals) keeps the class signal spatial: a model
must look at the lungs, mean brightness alone does not separate the classes.

:func:`write_kermany_tree` lays phantoms out like the Kermany (Mendeley) release, with its file
names, several images per patient, mixed JPEG/PNG and mixed L/RGB files;
:func:`write_pneumoniamnist_npz` writes a small PneumoniaMNIST-style ``.npz``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from pneumoscope import CLASS_NAMES

KERMANY_COUNTS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"train": (40, 60), "val": (4, 4), "test": (20, 30)}
)
"""Default ``split -> (n_normal, n_pneumonia)`` image counts for :func:`write_kermany_tree`."""

MNIST_COUNTS: Mapping[str, tuple[int, int]] = MappingProxyType(
    {"train": (30, 50), "val": (10, 10), "test": (10, 20)}
)
"""Default ``split -> (n_normal, n_pneumonia)`` counts for :func:`write_pneumoniamnist_npz`."""


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflected borders (numpy only, no SciPy dependency)."""
    if sigma < 0.3:
        return img
    radius = min(int(3.0 * sigma + 0.5), min(img.shape) - 1)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(img, radius, mode="reflect")
    h, w = img.shape
    rows = sum(k * padded[:, i : i + w] for i, k in enumerate(kernel))
    return sum(k * rows[i : i + h, :] for i, k in enumerate(kernel))


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, edge: float
) -> np.ndarray:
    """Soft ellipse mask in [0, 1]; ``edge`` is the width of the border ramp (normalised)."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return 1.0 / (1.0 + np.exp(np.clip((d - 1.0) / edge, -50.0, 50.0)))


def _point_in_ellipse(
    rng: np.random.Generator, cy: float, cx: float, ry: float, rx: float, reach: float
) -> tuple[float, float]:
    """A random point inside the ellipse, at most ``reach`` of the way to its border."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    r = reach * np.sqrt(rng.uniform(0.0, 1.0))
    return cy + r * ry * np.sin(angle), cx + r * rx * np.cos(angle)


_Ellipse = tuple[float, float, float, float]  # (centre y, centre x, radius y, radius x)


def _consolidation(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    lungs: list[_Ellipse],
    heart: _Ellipse,
    scale: float,
) -> np.ndarray:
    """Fraction of lung air replaced by fluid, in [0, 1]: one to four cloudy patches."""
    size = yy.shape[0]
    # Patchy texture: smoothed noise, shared by all patches of the image.
    texture = _gaussian_blur(rng.standard_normal((size, size)), 0.03 * size)
    texture = np.clip(0.5 + texture / (3.0 * texture.std() + 1e-9), 0.0, 1.0)
    n_patches = int(rng.choice([1, 2, 3, 4], p=[0.15, 0.35, 0.3, 0.2]))
    # A lone patch is a larger one (lobar pneumonia), so every case stays visible.
    spread = 1.3 if n_patches == 1 else 1.0
    clear = np.ones_like(yy)
    hy, hx, hry, hrx = heart
    for side in rng.integers(0, 2, size=n_patches):
        ly, lx, ry, rx = lungs[side]
        for _ in range(20):
            # Centre the patch off the heart shadow, which would hide most of it.
            py, px = _point_in_ellipse(rng, ly, lx, ry, rx, reach=0.6)
            if ((py - hy) / hry) ** 2 + ((px - hx) / hrx) ** 2 > 1.0:
                break
        sigma = rng.uniform(0.12, 0.2) * scale * spread
        # Flat-topped envelope: a consolidated region, not just a faint bright spot.
        envelope = np.minimum(
            1.0, 1.6 * np.exp(-0.5 * ((yy - py) ** 2 + (xx - px) ** 2) / sigma**2)
        )
        clear *= 1.0 - envelope * rng.uniform(0.85, 1.0)
    return (1.0 - clear) * (0.8 + 0.6 * texture)


def make_phantom(rng: np.random.Generator, size: int = 128, pneumonia: bool = False) -> np.ndarray:
    """One synthetic frontal chest X-ray as a ``(size, size)`` ``uint8`` array.

    Image right is the patient's left (radiological convention), so the heart shadow sits
    medially over the right-hand lung field. ``pneumonia=True`` fills part of one or both
    lungs with one to four cloudy, patchy opacities; normal phantoms never have them, but
    about a third carry a small, sharp benign nodule. All randomness comes from ``rng``.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    # Normalised coordinates: [-1, 1] across the image, y pointing down.
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    edge = max(0.02, 1.5 / size)  # keep ramps about a pixel wide at every size

    scale = rng.uniform(0.88, 1.05)
    cy, cx = rng.uniform(-0.05, 0.05), rng.uniform(-0.06, 0.06)

    img = np.full((size, size), rng.uniform(0.02, 0.12))
    # Torso: wider than the lungs, running off the bottom of the image like a real film.
    body = _ellipse(yy, xx, cy + 0.3, cx, 1.15 * scale, rng.uniform(0.86, 0.98) * scale, edge * 2.0)
    img += body * rng.uniform(0.45, 0.6)

    # Lung fields, each with its own size (normal anatomy varies too).
    lung_dy = cy - 0.05 * scale
    lungs: list[_Ellipse] = []
    for side in (-1.0, 1.0):
        ry = rng.uniform(0.5, 0.62) * scale
        rx = rng.uniform(0.24, 0.3) * scale
        lx = cx + side * rng.uniform(0.34, 0.41) * scale
        ly = lung_dy + rng.uniform(-0.04, 0.04)
        lungs.append((ly, lx, ry, rx))
    lung_mask = np.maximum(*(_ellipse(yy, xx, *lung, edge) for lung in lungs))

    # Heart shadow: over the medial lower part of the (image-right) left lung; it hides the
    # lung behind it rather than adding to it, so it reads as soft tissue, not as a hot spot.
    heart_shape: _Ellipse = (
        lung_dy + rng.uniform(0.25, 0.35) * scale,
        cx + rng.uniform(0.1, 0.16) * scale,
        rng.uniform(0.24, 0.3) * scale,
        rng.uniform(0.26, 0.32) * scale,
    )
    heart = _ellipse(yy, xx, *heart_shape, edge * 4.0)
    air = lung_mask * (1.0 - 0.85 * heart)
    # Pneumonia replaces air with fluid: the lung there turns as dense as soft tissue, never
    # brighter, so the signal is where the lung is grey, not a global brightness shift.
    fill = _consolidation(rng, yy, xx, lungs, heart_shape, scale) if pneumonia else 0.0
    # Vascular markings: faint fine texture in every lung, so "any texture" is not the signal.
    markings = _gaussian_blur(rng.standard_normal((size, size)), 0.012 * size)
    markings /= markings.std() + 1e-9
    img -= air * (rng.uniform(0.28, 0.38) * (1.0 - fill) - 0.03 * markings)
    img += heart * rng.uniform(0.04, 0.1)

    # Ribs: bands that curve downwards away from the spine, clearest over the lungs.
    spacing = rng.uniform(0.11, 0.16) * scale
    thickness = rng.uniform(0.022, 0.035) * scale
    curve = rng.uniform(0.6, 1.1)
    top = lung_dy - 0.65 * scale + rng.uniform(0.0, spacing)
    lateral = np.abs(xx - cx)
    ribs = np.zeros_like(img)
    for k in range(int(1.4 * scale / spacing) + 1):
        centre = top + k * spacing + curve * lateral**2
        ribs = np.maximum(ribs, np.exp(-0.5 * ((yy - centre) / thickness) ** 2))
    ribs *= np.clip((lateral - 0.06) / 0.1, 0.0, 1.0)  # ribs meet the spine, not cross it
    img += ribs * body * (0.4 + 0.6 * lung_mask) * rng.uniform(0.06, 0.12)

    # Spine and mediastinum: a bright vertical band down the middle.
    spine = np.exp(-0.5 * ((xx - cx) / (rng.uniform(0.06, 0.09) * scale)) ** 2)
    img += spine * body * rng.uniform(0.12, 0.2)

    if not pneumonia and rng.random() < 0.35:
        # Benign nodule: small, sharp and round, unlike a cloudy consolidation.
        ly, lx, ry, rx = lungs[int(rng.integers(0, 2))]
        py, px = _point_in_ellipse(rng, ly, lx, ry, rx, reach=0.7)
        radius = rng.uniform(0.025, 0.045)
        img += _ellipse(yy, xx, py, px, radius, radius, edge) * rng.uniform(0.2, 0.3)

    # Acquisition: blur, exposure (contrast/brightness/gamma), quantum noise.
    img = _gaussian_blur(img, rng.uniform(0.4, 1.0) * size / 128.0)
    img = (img - 0.4) * rng.uniform(0.9, 1.12) + 0.4 + rng.uniform(-0.06, 0.06)
    img = np.clip(img, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
    img += rng.normal(0.0, rng.uniform(0.01, 0.03), img.shape)
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


def _patient_sizes(n_images: int, per_patient: int) -> list[int]:
    """Split ``n_images`` into patients of ``per_patient`` images (the last may have fewer)."""
    full, rest = divmod(n_images, per_patient)
    return [per_patient] * full + ([rest] if rest else [])


def _save(gray: np.ndarray, path: Path, rgb: bool) -> None:
    img = Image.fromarray(gray, mode="L")
    if rgb:
        # Part of the real release is stored as RGB with three identical channels.
        img = img.convert("RGB")
    if path.suffix == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=92)


def write_kermany_tree(
    root: str | Path,
    counts: Mapping[str, tuple[int, int]] = KERMANY_COUNTS,
    *,
    size: int = 96,
    seed: int = 0,
    images_per_patient: int = 3,
    png_share: float = 0.25,
) -> Path:
    """Write phantoms as ``root/{split}/{NORMAL,PNEUMONIA}/`` with Kermany-style file names.

    ``counts`` maps each split to ``(n_normal, n_pneumonia)`` images. PNEUMONIA files are
    ``person{P}_{bacteria|virus}_{K}.jpeg`` (one subtype per patient); NORMAL files are
    ``IM-{P:04d}-{K:04d}.jpeg`` or, for about a third of the patients,
    ``NORMAL2-IM-{P:04d}-{K:04d}-0001.jpeg``. Patients have ``images_per_patient`` images
    each (the last one of a folder may have fewer), and patient numbers never repeat across
    splits. In each folder ``round(png_share * n)`` files are PNG (``.png``) instead of JPEG,
    and about a third of all files are RGB. The same ``seed`` writes the same files.
    """
    if images_per_patient < 1:
        raise ValueError(f"images_per_patient must be at least 1, got {images_per_patient}")
    if not 0.0 <= png_share <= 1.0:
        raise ValueError(f"png_share must be in [0, 1], got {png_share}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    next_patient = 1  # one counter for every split and class, so ids never collide
    next_person_image = 1  # Kermany numbers PNEUMONIA images with a running index
    for split, per_class in counts.items():
        for label, (name, n_images) in enumerate(zip(CLASS_NAMES, per_class, strict=True)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            stems = []
            for n_for_patient in _patient_sizes(n_images, images_per_patient):
                patient = next_patient
                next_patient += 1
                if label:
                    subtype = "bacteria" if rng.random() < 0.6 else "virus"
                    for _ in range(n_for_patient):
                        stems.append(f"person{patient}_{subtype}_{next_person_image}")
                        next_person_image += 1
                else:
                    prefix = "NORMAL2-" if rng.random() < 1 / 3 else ""
                    suffix = "-0001" if prefix else ""
                    stems.extend(
                        f"{prefix}IM-{patient:04d}-{k:04d}{suffix}"
                        for k in range(1, n_for_patient + 1)
                    )
            png = set(rng.permutation(len(stems))[: round(png_share * len(stems))].tolist())
            for i, stem in enumerate(stems):
                gray = make_phantom(rng, size, pneumonia=bool(label))
                suffix = ".png" if i in png else ".jpeg"
                _save(gray, folder / f"{stem}{suffix}", rgb=bool(rng.random() < 1 / 3))
    return root


def write_pneumoniamnist_npz(
    path: str | Path,
    counts: Mapping[str, tuple[int, int]] = MNIST_COUNTS,
    *,
    seed: int = 0,
) -> Path:
    """Write a PneumoniaMNIST-style ``.npz`` of 28x28 phantoms and return its path.

    Keys are ``{split}_images`` (``uint8``, ``(N, 28, 28)``) and ``{split}_labels``
    (``uint8``, ``(N, 1)``, 0 = normal, 1 = pneumonia) for each split in ``counts``, which maps
    a split to ``(n_normal, n_pneumonia)``. Classes are shuffled within a split, as in MedMNIST.
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for split, (n_normal, n_pneumonia) in counts.items():
        labels = np.array([0] * n_normal + [1] * n_pneumonia, dtype=np.uint8)
        labels = labels[rng.permutation(len(labels))]
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i] = make_phantom(rng, 28, pneumonia=bool(label))
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # np.savez appends ".npz" to names without it; write through a handle to keep ``path``.
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return path
