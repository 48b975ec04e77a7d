"""The one place where image files become pixel arrays.

Training, evaluation, prediction and serving all decode through :func:`decode_image` (or its
shorthand :func:`load_grayscale`), so a model never sees pixels that went through a different
path than the ones it was trained on (see ../shared/data/README.md: a model learned the
preprocessing history instead of the lungs). :func:`decode_image` also keeps the few facts
about the source that the grey pixels lose and the input gate (:mod:`pneumoscope.guard`)
needs: its size, how coloured it was, and its DICOM tags.

The format is decided by content, never by the file name, and one rule says which formats are
accepted, for every command and the web service alike (:data:`SUPPORTED_FORMATS`): DICOM by
its ``DICM`` magic at byte 128 (read with pydicom, the ``dicom`` extra), PNG and JPEG by their
signatures (read with Pillow, which is told to open nothing else). GIF, BMP, TIFF, WebP,
JPEG 2000 files and the rest of Pillow's formats are refused, whatever their name: they are
not how radiographs are exported, and each extra parser is more code reading untrusted bytes.

Transparency (RGBA, LA, palette with a transparent entry) is a property of how a file is
displayed, not of the radiograph: the stored grey values are the measurement, so alpha is
dropped and a semi-transparent film gives the same pixels as the same film without alpha
(compositing would scale them by alpha, and the answer with them). Fully transparent pixels
have no defined value (exporters store anything there) and become black, the radiograph's
background: no attenuation, as air and the area outside the body are shown.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".dcm"})
"""File endings treated as images when scanning folders."""

SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "DICOM")
"""The formats every command and the web service accept, told by content (:func:`sniff_format`)."""

_PILLOW_FORMATS: tuple[str, ...] = ("JPEG", "PNG")
"""What Pillow may open (``Image.open(formats=...)``): :data:`SUPPORTED_FORMATS` but DICOM."""

_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"))
"""Pillow's own acceptance tests for these two formats (its ``_accept`` functions)."""

_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"%PDF", "PDF"), (b"\x1f\x8b", "gzip"), (b"PK\x03\x04", "zip"))
"""Formats that are recognised only to say what a refused file is."""

MAX_PIXELS: int = 50_000_000
"""Images above this many pixels are refused (decompression bombs, absurd scans)."""

MAX_ASPECT: float = 20.0
"""Images longer than this many times their width (or wider than their height) are refused:
no film is a 20:1 strip, and every later step (the square resize, an overlay) would otherwise
blow one side of a tiny upload up to thousands of pixels. Checked on the header, before
decoding, for every path (CLI, API, training), whatever the input gate says."""


DICOM_INSTALL_HINT = "pip install 'pneumoscope[dicom]'"

_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
_MIN_SIDE = 8

DICOM_GATE_TAGS: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ViewPosition", "PhotometricInterpretation")
"""DICOM attributes kept in :attr:`DecodedImage.dicom` (what the input gate checks)."""

SPREAD_SIDE = 256
"""Channel spread is measured on a nearest-neighbour copy at most this many pixels a side: a
sample of the pixels, so a 50-megapixel photo costs no more than a thumbnail."""

_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

DRAFT_MARGIN = 2
"""With a ``draft_size``, a large JPEG is decoded at the smallest DCT scale (1/2, 1/4 or 1/8,
libjpeg's scaled IDCT through Pillow's ``Image.draft``) that keeps both sides at least this
many times ``draft_size``, and a large DICOM is block-averaged by a power of two as far: the
final square resize still averages >= 2 decoded pixels per output pixel (a margin of 1 is
faster but about 2.5x further from a full decode; benchmarks/speed2.py measures both)."""


@dataclass(frozen=True)
class DecodedImage:
    """A decoded image: the grey pixels every model sees, plus what grey conversion loses."""

    gray: np.ndarray
    """2-D ``uint8`` grayscale pixels (the output of :func:`load_grayscale`)."""
    width: int
    """Width of the source as displayed (after EXIF orientation), in pixels."""
    height: int
    channel_spread: float
    """How coloured the source is: the 99th percentile over pixels of (max channel − min
    channel), 0–255 units. 0 for grey modes and DICOM; grey stored as RGB gives about 0 (plus
    JPEG chroma noise)."""
    dicom: dict[str, str] | None = None
    """The :data:`DICOM_GATE_TAGS` present in a DICOM file (upper-case strings); None otherwise."""


class ImageDecodeError(ValueError):
    """A file could not be turned into a grayscale image; the message names the file and why."""


def is_dicom(head: bytes) -> bool:
    """Whether ``head`` (the first 132+ bytes of a file) starts a DICOM Part 10 file."""
    return head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC


def sniff_format(head: bytes) -> str | None:
    """The :data:`SUPPORTED_FORMATS` entry ``head`` (the first 132+ bytes of a file) starts, or
    None. DICOM is checked first: its 128-byte preamble may itself look like another format."""
    if is_dicom(head):
        return "DICOM"
    return next((kind for magic, kind in _SIGNATURES if head.startswith(magic)), None)


def _unsupported(name: str, head: bytes) -> ImageDecodeError:
    other = next((kind for magic, kind in _OTHER_SIGNATURES if head.startswith(magic)), None)
    if other is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        other = "WebP"
    what = f"unsupported file type {other}" if other else "not a recognised image file"
    return ImageDecodeError(f"{name}: {what} (PneumoScope reads {', '.join(SUPPORTED_FORMATS)}, "
                            "told by content, not by name)")


def _detail(exc: BaseException) -> str:
    """An exception as one line (pydicom's and Pillow's messages may span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{name}: image is {width}x{height} = {width * height} pixels, "
            f"above the limit of {max_pixels}"
        )
    if width < _MIN_SIDE or height < _MIN_SIDE:
        raise ImageDecodeError(f"{name}: image is only {width}x{height} pixels")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageDecodeError(f"{name}: image is {width}x{height} pixels, an aspect ratio above "
                               f"{MAX_ASPECT:g}:1 (not a radiograph)")


class _QuietDecoderTracebacks(logging.Filter):
    """pydicom 3 logs every failing pixel decoder plugin's traceback at ERROR, then raises; the
    failure reaches the user once, as the file's one-line :class:`ImageDecodeError`. The
    traceback is kept with debug logging (``--verbose``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or log.isEnabledFor(logging.DEBUG)


_PYDICOM_DECODER_LOGGER = "pydicom.pixels.decoders.base"
_QUIET = _QuietDecoderTracebacks()


def _import_pydicom(name: str) -> Any:
    try:
        import pydicom
    except ImportError as exc:
        # A per-file error (not ModuleNotFoundError) so a batch goes on with its other files.
        raise ImageDecodeError(
            f"{name}: is a DICOM file, and reading DICOM needs pydicom: {DICOM_INSTALL_HINT}"
        ) from exc
    # A logger's filters act on the records logged to it (not on its children's): the module
    # logger that logs the tracebacks itself. Adding the same filter twice is a no-op.
    logging.getLogger(_PYDICOM_DECODER_LOGGER).addFilter(_QUIET)
    return pydicom


def _dicom_luts() -> tuple[Any, Any]:
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _voi_output_range(ds: Any, apply_voi_lut: Any) -> tuple[float, float] | None:
    """The output range of the VOI transform ``apply_voi_lut`` applies to this dataset, or
    None when it has none. Scaling over this range (not over the pixels' own min/max) keeps
    the radiologist's window: an image lying inside the window is not stretched."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        # pydicom prefers the LUT over a window when both are present: range of the table.
        n_entries, first = int(seq[0].LUTDescriptor[0]) or 2**16, int(seq[0].LUTDescriptor[1])
        table = apply_voi_lut(np.arange(first, first + n_entries, dtype=np.int64), ds)
        return float(np.min(table)), float(np.max(table))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # Infinite inputs land on the two ends of the window's output (linear or sigmoid).
        ends = apply_voi_lut(np.array([-np.inf, np.inf]), ds)
        return float(ends[0]), float(ends[1])
    return None


def _shrink_stored(arr: np.ndarray, draft_size: int | None) -> np.ndarray:
    """Stored DICOM pixels block-averaged by the largest power of two that keeps the short side
    at least ``DRAFT_MARGIN * draft_size`` (unchanged without one), in their own integer dtype:
    the LUTs and the float conversion that follow then touch 1/4, 1/16 ... of the pixels. The
    last ``factor - 1`` rows/columns at most are dropped (under 0.5 % of a film's side)."""
    factor = 1
    while draft_size and min(arr.shape) // (2 * factor) >= DRAFT_MARGIN * draft_size:
        factor *= 2
    if factor == 1:
        return arr
    h, w = arr.shape[0] // factor, arr.shape[1] // factor
    blocks = arr[:h * factor, :w * factor].reshape(h, factor, w, factor)
    total = blocks.sum(axis=(1, 3), dtype=np.int64)
    return ((total + factor * factor // 2) // (factor * factor)).astype(arr.dtype)


def _load_dicom(fp: IO[bytes], name: str, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode a single-frame grayscale DICOM: Modality LUT (rescale), VOI LUT (window),
    MONOCHROME1 inverted, scaled to uint8 over the windowed range (``draft_size``: see
    :func:`_shrink_stored`; the reported size stays the header's)."""
    pydicom = _import_pydicom(name)
    try:
        ds = pydicom.dcmread(fp)
    except Exception as exc:  # InvalidDicomError, truncated elements, bad VRs ...
        raise ImageDecodeError(f"{name}: corrupt DICOM file ({_detail(exc)})") from exc
    if "PixelData" not in ds:
        kind = ds.get("Modality") or ds.get("SOPClassUID", "?")
        raise ImageDecodeError(f"{name}: DICOM file has no pixel data (not an image; {kind})")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise ImageDecodeError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; "
                               "export the frontal view as a single-frame file")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageDecodeError(f"{name}: colour DICOM ({photometric or '?'}, {samples} samples per "
                               "pixel) is not supported; chest X-rays are MONOCHROME1/2")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise ImageDecodeError(f"{name}: DICOM file has no Rows/Columns")
    # Before touching the pixel data: a header can claim any size.
    _check_size(name, int(cols), int(rows), max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # compressed syntax without a plugin, short pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax) or "?"
        raise ImageDecodeError(f"{name}: cannot decode DICOM pixel data (transfer syntax "
                               f"{syntax_name}; {_detail(exc)})") from exc
    if arr.ndim != 2:
        raise ImageDecodeError(f"{name}: DICOM pixel data has shape {arr.shape}, expected 2-D")
    arr = _shrink_stored(arr, draft_size)
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    try:
        arr = apply_modality_lut(arr, ds)
        if (ds.get("VOILUTSequence") and not np.issubdtype(arr.dtype, np.integer)
                and np.array_equal(arr, np.round(arr))):
            arr = arr.astype(np.int64)  # a LUT indexes by integers; rescale made whole floats
        out_range = _voi_output_range(ds, apply_voi_lut)
        arr = np.asarray(apply_voi_lut(arr, ds), dtype=np.float64)
    except Exception as exc:  # bad window width, unsupported LUT depth, ...
        raise ImageDecodeError(f"{name}: invalid DICOM LUT/window ({_detail(exc)})") from exc
    lo, hi = out_range or (float(arr.min()), float(arr.max()))
    if hi <= lo:
        gray = np.zeros(arr.shape, dtype=np.uint8)
    else:
        gray = np.round(np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    # MONOCHROME1: the lowest value is white; every other decoder path gives dark = low.
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    tags = {tag: str(ds.get(tag)).strip().upper() for tag in DICOM_GATE_TAGS
            if ds.get(tag) not in (None, "")}
    return DecodedImage(gray, int(cols), int(rows), 0.0, tags)


def _draft(img: Image.Image, draft_size: int | None) -> tuple[int, int] | None:
    """Ask libjpeg for a DCT-scaled decode of a not yet loaded JPEG (see :data:`DRAFT_MARGIN`);
    returns the source's displayed (width, height) when it did, else None. The mode is kept
    (an RGB JPEG stays RGB): the colour check reads the channels."""
    if not draft_size or img.format != "JPEG":
        return None
    width, height = img.size
    target = DRAFT_MARGIN * draft_size
    if img.draft(img.mode, (target, target)) is None or img.size == (width, height):
        return None
    # exif_transpose turns orientations 5-8 by 90 degrees: the displayed sides swap.
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
        width, height = height, width
    return width, height


def _channel_spread(img: Image.Image) -> float:
    """:attr:`DecodedImage.channel_spread` of an (alpha-composited) Pillow image."""
    if img.mode in _GREY_MODES:
        return 0.0
    step = max(1, -(-max(img.size) // SPREAD_SIDE))  # ceil: the copy is at most SPREAD_SIDE
    small = img.resize((max(1, img.width // step), max(1, img.height // step)),
                       Image.Resampling.NEAREST) if step > 1 else img
    rgb = np.asarray(small.convert("RGB"), dtype=np.int16)
    return float(np.percentile(rgb.max(axis=2) - rgb.min(axis=2), 99))


def _to_uint8_gray(img: Image.Image) -> tuple[np.ndarray, float]:
    """Convert any Pillow mode (L, RGB, RGBA, P, I;16, I, F) to an 8-bit grayscale array;
    returns it with the source's :func:`_channel_spread`."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float PNGs: scale the full range to 0..255 rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, dtype=np.uint8), 0.0
        return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8), 0.0
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Alpha dropped, fully transparent pixels black (module docstring: why).
        rgba = np.asarray(img.convert("RGBA"))
        rgb = rgba[..., :3].copy()
        rgb[rgba[..., 3] == 0] = 0
        img = Image.fromarray(rgb)
    return np.asarray(img.convert("L"), dtype=np.uint8), _channel_spread(img)


def decode_image(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS,
                 name: str | None = None, draft_size: int | None = None) -> DecodedImage:
    """Decode a JPEG/PNG/DICOM file (path or raw bytes) into a :class:`DecodedImage`.

    The format is detected from the content, not the file name; other formats are refused
    (:data:`SUPPORTED_FORMATS`). EXIF orientation is applied;
    DICOM goes through its Modality and VOI LUTs (see :func:`_load_dicom`). ``draft_size``: the
    side the pixels will be resized to; a JPEG or DICOM far larger is decoded at a reduced
    scale (:data:`DRAFT_MARGIN`), ``gray`` is then smaller than the source while ``width`` and
    ``height`` stay the source's. Raises
    :class:`ImageDecodeError`, whose message starts with ``name`` (default: the path, or
    ``<bytes>``), for anything that is not a readable image, or that has more than
    ``max_pixels`` pixels.
    """
    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot open file ({exc.strerror or exc})") from exc
    try:
        with fp, warnings.catch_warnings():
            head = fp.read(_DICOM_MAGIC_OFFSET + len(_DICOM_MAGIC))
            fp.seek(0)
            if is_dicom(head):
                return _load_dicom(fp, name, max_pixels, draft_size)
            if sniff_format(head) is None:
                raise _unsupported(name, head)
            # Pillow warns (DecompressionBombWarning) before it errors; we apply our own limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp, formats=_PILLOW_FORMATS)
            except UnidentifiedImageError as exc:
                raise ImageDecodeError(f"{name}: corrupt or truncated image (its header is "
                                       "unreadable)") from exc
            except Image.DecompressionBombError as exc:
                raise ImageDecodeError(f"{name}: image too large ({exc})") from exc
            width, height = img.size
            _check_size(name, width, height, max_pixels)
            try:
                source_size = _draft(img, draft_size)
                img.load()
                img = ImageOps.exif_transpose(img)
                gray, spread = _to_uint8_gray(img)
            except (OSError, SyntaxError, ValueError) as exc:
                raise ImageDecodeError(f"{name}: corrupt or truncated image "
                                       f"({' '.join(str(exc).split())})") from exc
    except ImageDecodeError:
        raise
    except Exception as exc:  # any other decoder failure is still the file's fault
        raise ImageDecodeError(f"{name}: cannot decode image ({_detail(exc)})") from exc
    width, height = source_size or (gray.shape[1], gray.shape[0])
    return DecodedImage(gray, width, height, spread)


def load_grayscale(source: str | Path | bytes, *, max_pixels: int = MAX_PIXELS,
                   draft_size: int | None = None) -> np.ndarray:
    """Decode a JPEG/PNG/DICOM file (path or raw bytes) into a 2-D ``uint8`` grayscale array:
    :func:`decode_image`'s pixels (same output, same errors)."""
    return decode_image(source, max_pixels=max_pixels, draft_size=draft_size).gray


def resize_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a grayscale array to ``size x size`` (aspect ratio not kept, as in the reference
    study and the shared 224x224 copy), with Pillow's bicubic filter."""
    if gray.shape == (size, size):
        return gray
    img = Image.fromarray(gray, mode="L")
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
