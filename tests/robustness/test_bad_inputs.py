"""The bad-input suite (#13, "Make it stay fixed").

It generates its own corpus (bad and odd image files, DICOM edge cases, odd names, links and
other file-system entries, tampered model files) and runs it through the command line
(``predict`` on the folder, on every file named, and once as a real process; ``explain`` on
the folder) and the web service (``/v1/predict``, ``/v1/explain``). What must hold:

- no traceback anywhere (stderr, logs) and no "internal error": every failure is one line;
- no HTTP 5xx;
- one row per input, or a named skip: nothing is lost;
- each kind ends as expected: a label for a readable film, the gate's refusal for what is not
  a chest film, an error row (4xx from the service) for what cannot be read.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pydicom = pytest.importorskip("pydicom")

import pneumoscope  # noqa: E402
from conftest import write_broken_jpeg2000_dicom, write_compressed_dicom, write_dicom  # noqa: E402
from pneumoscope import CLASS_NAMES  # noqa: E402
from pneumoscope.cli import main  # noqa: E402
from pneumoscope.data.synthetic import make_phantom  # noqa: E402
from pneumoscope.models.checkpoint import CheckpointInfo, read_info, save_checkpoint  # noqa: E402
from pneumoscope.models.factory import build_model  # noqa: E402
from pneumoscope.serve.results import safe_text  # noqa: E402

SIDE = 96  # above the gate's smallest plausible side (64 px)


# --- the corpus --------------------------------------------------------------------------------

def _film(seed: int = 0, side: int = SIDE) -> np.ndarray:
    return make_phantom(np.random.default_rng(seed), side, pneumonia=seed % 2 == 1)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray, **kw: object) -> bytes:
    return _encode(Image.fromarray(arr), "PNG", **kw)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


def _ztxt_bomb() -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to 64 MB (above Pillow's text limit)."""
    good = _png(_film())
    ztxt = _chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"A" * 64_000_000, 9))
    return good[:33] + ztxt + good[33:]


def _bad_crc() -> bytes:
    data = bytearray(_png(_film()))
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def _alpha(mode: str, alpha: int) -> bytes:
    film = _film(2)
    a = np.full_like(film, alpha)
    if mode == "LA":
        return _encode(Image.fromarray(np.stack([film, a], -1), "LA"), "PNG")
    return _encode(Image.fromarray(np.stack([film, film, film, a], -1), "RGBA"), "PNG")


def _palette_transparent() -> bytes:
    img = Image.fromarray(_film(3)).convert("P")
    img.info["transparency"] = 0
    return _encode(img, "PNG")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(_film(4)), "JPEG", exif=exif, quality=95)


def _apng() -> bytes:
    frames = [Image.fromarray(_film(i)) for i in (5, 6)]
    return _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


def _float_tiff() -> bytes:
    arr = _film(7).astype(np.float32)
    arr[0, :10] = np.nan
    arr[1, :10] = np.inf
    return _encode(Image.fromarray(arr, "F"), "TIFF")


def _colour_photo() -> bytes:
    rng = np.random.default_rng(8)
    return _encode(Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), np.uint8), "RGB"), "JPEG")


def _dicom(**kwargs: object) -> Callable[[Path], None]:
    pixels = kwargs.pop("pixels", _film(9).astype(np.uint16) * 16)
    return lambda path: write_dicom(path, pixels, **kwargs)  # type: ignore[arg-type]


def _dicom_wrong_bits(path: Path) -> None:
    write_dicom(path, _film(10).astype(np.uint16) * 16)
    ds = pydicom.dcmread(path)
    ds.BitsAllocated = 8  # says 8 bits, holds 16: twice the pixel data it should
    ds.save_as(path, enforce_file_format=True)


def _dicom_short_pixels(path: Path) -> None:
    write_dicom(path, _film(11).astype(np.uint16) * 16)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(path, enforce_file_format=True)


def _truncated(data_of: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: data_of()[: len(data_of()) // 2]


Maker = Callable[[], bytes] | Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    name: str
    """The file name in the corpus (the case's id)."""
    make: Maker
    """The file's bytes, or a function that writes the file at a path."""
    expect: str
    """``label`` (a readable film), ``refuse`` (the gate: not a chest film) or ``error``."""

    def write(self, folder: Path) -> Path:
        path = folder / self.name
        if self.make.__code__.co_argcount:  # writes the file itself
            self.make(path)  # type: ignore[call-arg]
        else:
            path.write_bytes(self.make())  # type: ignore[call-arg]
        return path


def _jpeg(seed: int, **kw: object) -> Callable[[], bytes]:
    return lambda: _encode(Image.fromarray(_film(seed)), "JPEG", quality=95, **kw)


def _other(fmt: str, **kw: object) -> Callable[[], bytes]:
    return lambda: _encode(Image.fromarray(_film(12)), fmt, **kw)


CASES: tuple[Case, ...] = (
    # Readable films, in every form the decoder promises to read.
    Case("good.png", lambda: _png(_film(0)), "label"),
    Case("good.jpeg", _jpeg(1), "label"),
    Case("good.dcm", _dicom(), "label"),
    Case("dicom_monochrome1.dcm", _dicom(photometric="MONOCHROME1"), "label"),
    Case("png16.png", lambda: _png(_film(13).astype(np.uint16) * 257), "label"),
    Case("alpha_reference.png", lambda: _png(_film(2)), "label"),  # the alpha cases' film, no alpha
    Case("rgba_opaque.png", lambda: _alpha("RGBA", 255), "label"),
    Case("rgba_half_transparent.png", lambda: _alpha("RGBA", 128), "label"),
    Case("la.png", lambda: _alpha("LA", 200), "label"),
    Case("palette_transparent.png", _palette_transparent, "label"),
    Case("palette.png", lambda: _encode(Image.fromarray(_film(14)).convert("P"), "PNG"), "label"),
    Case("cmyk.jpg", lambda: _encode(Image.fromarray(_film(15)).convert("CMYK"), "JPEG"), "label"),
    Case("exif_rotated.jpg", _exif_rotated, "label"),
    Case("progressive.jpg", _jpeg(16, progressive=True), "label"),
    Case("interlaced.png", lambda: _encode(Image.fromarray(_film(17)), "PNG", interlace=1), "label"),
    Case("animated.png", _apng, "label"),
    Case("UPPER.PNG", lambda: _png(_film(18)), "label"),
    # Odd names, good content.
    Case("with space.png", lambda: _png(_film(19)), "label"),
    Case("ünïcødé 胸部.png", lambda: _png(_film(20)), "label"),
    Case("new\nline.png", lambda: _png(_film(21)), "label"),
    Case("-leading-dash.png", lambda: _png(_film(22)), "label"),
    Case("quote'\"comma,semi;=cmd.png", lambda: _png(_film(23)), "label"),
    Case("percent%s{0}.png", lambda: _png(_film(24)), "label"),
    Case("long" + "x" * 200 + ".png", lambda: _png(_film(25)), "label"),
    # Not chest films: the gate refuses them (no probability, no label).
    Case("constant_black.png", lambda: _png(np.zeros((1000, 1000), np.uint8)), "refuse"),
    Case("colour_photo.jpg", _colour_photo, "refuse"),
    # The decoder refuses anything past 20:1 (gate on or off): an error row, not a refusal.
    Case("sliver_8x3000.png", lambda: _png(np.tile(_film(26, 16)[:, :8], (188, 1))[:3000]), "error"),
    Case("small_40px.png", lambda: _png(_film(27, 40)), "refuse"),
    Case("dicom_lateral.dcm", _dicom(ViewPosition="LL"), "refuse"),
    Case("dicom_ct.dcm", _dicom(Modality="CT"), "refuse"),
    # Unreadable: an error row (the service: 4xx).
    Case("zero_byte.png", lambda: b"", "error"),
    Case("text.png", lambda: b"just some text, renamed\n" * 10, "error"),
    Case("html.jpg", lambda: b"<!doctype html><html><body>404 Not Found</body></html>\n", "error"),
    Case("pdf.png", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "error"),
    Case("truncated.png", _truncated(lambda: _png(_film(28))), "error"),
    Case("truncated.jpeg", _truncated(_jpeg(29)), "error"),
    Case("corrupt.jpeg", lambda: b"\xff\xd8\xff\xe0" + np.random.default_rng(30).bytes(400), "error"),
    Case("bad_crc.png", _bad_crc, "error"),
    Case("ztxt_bomb.png", _ztxt_bomb, "error"),
    Case("bomb_100000x100000.png", lambda: _png_header_only(100_000, 100_000), "error"),
    Case("one_px.png", lambda: _png(np.full((1, 1), 128, np.uint8)), "error"),
    Case("gif_renamed.png", _other("GIF"), "error"),
    Case("bmp_renamed.png", _other("BMP"), "error"),
    Case("tiff_renamed.png", _other("TIFF"), "error"),
    Case("webp_renamed.jpg", _other("WEBP", lossless=True), "error"),
    Case("jpeg2000_renamed.png", _other("JPEG2000"), "error"),
    Case("float_nan_tiff.png", _float_tiff, "error"),
    Case("dicom_no_pixels.dcm", _dicom(pixels=None), "error"),
    Case("dicom_wrong_bits.dcm", _dicom_wrong_bits, "error"),
    Case("dicom_short_pixel_data.dcm", _dicom_short_pixels, "error"),
    Case("dicom_jpeg2000_undecodable.dcm", write_broken_jpeg2000_dicom, "error"),
    # JPEG-LS needs a plugin (pylibjpeg / pyjpegls) that is not a dependency: no decoder at all.
    Case("dicom_jpegls_no_decoder.dcm", lambda p: write_compressed_dicom(  # type: ignore[misc]
        p, pydicom.uid.JPEGLSLossless, b"\xff\xd8\xff\xf7" + b"\0" * 40), "error"),
    Case("dicom_multiframe.dcm", _dicom(pixels=np.zeros((2, SIDE, SIDE), np.uint16), frames=2), "error"),
    Case("dicom_rgb.dcm", _dicom(pixels=np.zeros((SIDE, SIDE, 3), np.uint16), photometric="RGB",
                                 samples=3), "error"),
    Case("dicom_claims_60000x60000.dcm", _dicom(rows=60000, cols=60000), "error"),
    Case("dicom_truncated.dcm", lambda p: p.write_bytes(  # type: ignore[misc]
        write_dicom(p, _film(31).astype(np.uint16)).read_bytes()[:400]), "error"),
)

NON_UTF8_NAME = os.fsdecode(b"non-utf8-\xff\xfe.png")
"""A name that is not valid UTF-8 (surrogate-escaped by Python): item 3 of the issue."""


def _fs_entries(folder: Path) -> dict[str, str]:
    """Things in a folder that are not regular image files: name → what it is."""
    (folder / "broken_link.png").symlink_to(folder / "nowhere.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "directory.png").mkdir()
    os.mkfifo(folder / "fifo.png")  # opening it would block: it must never be opened
    (folder / ".hidden.png").write_bytes(_png(_film(32)))
    (folder / "scan.tif").write_bytes(_png(_film(33)))  # an image, under a suffix scans skip
    return {"broken_link.png": "broken link", "loop.png": "symlink loop", "directory.png": "folder",
            "fifo.png": "FIFO", ".hidden.png": "hidden file", "scan.tif": "unknown suffix"}


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-18 at 32 px with a scaled head (probabilities differ per image)."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4)
    return save_checkpoint(tmp_path_factory.mktemp("bad-inputs-model") / "model.safetensors", model, info)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-inputs") / "corpus"
    folder.mkdir()
    return {case.name: case.write(folder) for case in CASES}


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """``main`` installs a root log handler on the sys.stderr of the moment (a capture that is
    closed after the test) and sets the root level: put both back afterwards."""
    root = logging.getLogger()
    # A handler left by an earlier test's ``main`` may write to a capture closed since: logging
    # would print its own "--- Logging error ---" traceback for every line.
    handlers = [h for h in root.handlers if not getattr(getattr(h, "stream", None), "closed", False)]
    level = root.level
    root.handlers[:] = handlers
    root.setLevel(logging.INFO)  # as `pneumoscope` without --verbose (an earlier test may have set DEBUG)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with _logging_restored():
        yield


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert "internal error" not in text, text[-3000:]


@dataclass
class Run:
    rc: int
    out: str
    err: str
    rows: dict[str, dict]
    """Rows of the result file by file name."""
    n_rows: int


def _by_name(rows: list[dict]) -> dict[str, dict]:
    """Rows by the file name a case wrote: result files escape control characters and
    non-UTF-8 bytes (``safe_text``), so a row is always one line."""
    written = {safe_text(case.name): case.name for case in CASES}
    return {written.get(Path(r["path"]).name, Path(r["path"]).name): r for r in rows}


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as fh:
        return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(fh)]


def _predict(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
             argv: list[str], out: Path) -> Run:
    caplog.clear()
    rc = main(["predict", *argv, "--out", str(out)])
    captured = capsys.readouterr()
    logged = [r for r in caplog.records if r.exc_info]
    assert not logged, f"logged with a traceback: {logged[0].getMessage()}"
    rows = _read_rows(out) if out.exists() else []
    return Run(rc, captured.out, captured.err, _by_name(rows), len(rows))


@pytest.fixture(scope="module")
def folder_run(tiny_model: Path, corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[Run]:
    yield _module_predict(tiny_model, [str(next(iter(corpus.values())).parent)],
                          tmp_path_factory.mktemp("folder-run") / "rows.csv")


@pytest.fixture(scope="module")
def named_run(tiny_model: Path, corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
              ) -> Iterator[Run]:
    yield _module_predict(tiny_model, [str(p) for p in corpus.values()],
                          tmp_path_factory.mktemp("named-run") / "rows.json")


def _module_predict(model: Path, inputs: list[str], out: Path) -> Run:
    """``predict`` in this process, outside the per-test capture (a module fixture)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    err, std = io.StringIO(), io.StringIO()
    with _logging_restored(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        logging.getLogger().addHandler(keep)
        try:
            rc = main(["predict", str(model), *inputs, "--out", str(out)])
        finally:
            logging.getLogger().removeHandler(keep)
    traced = [r.getMessage() for r in records if r.exc_info]
    assert not traced, f"logged with a traceback: {traced[0]}"
    rows = _read_rows(out) if out.exists() else []
    return Run(rc, std.getvalue(), err.getvalue(), _by_name(rows), len(rows))


def _check_row(row: dict | None, case: Case) -> None:
    assert row is not None, f"no row for {case.name!r}: lost"
    prob = row["prob_pneumonia"]
    prob = None if prob is None else float(prob)
    if case.expect == "error":
        assert row["error"] and prob is None and row["label"] is None, row
        assert case.name.split("\n")[-1] in row["error"] or "\n" in case.name, row["error"]
    elif case.expect == "refuse":
        assert not row["error"] and row["gate"] == "refuse", row
        assert prob is None and row["label"] is None, row
    else:
        assert not row["error"] and row["gate"] in ("ok", "warn"), row
        assert prob is not None and math.isfinite(prob) and 0.0 <= prob <= 1.0, row
        assert row["label"] in CLASS_NAMES, row


# --- the command line --------------------------------------------------------------------------

def test_folder_scan_gives_one_row_per_file_and_no_traceback(folder_run: Run) -> None:
    _no_traceback(folder_run.err)
    assert folder_run.rc == 1  # some files failed: said by the exit status, not by a crash
    assert folder_run.n_rows == len(CASES) and set(folder_run.rows) == {c.name for c in CASES}


def test_every_file_named_gives_its_row(named_run: Run) -> None:
    _no_traceback(named_run.err)
    assert named_run.rc == 1
    assert named_run.n_rows == len(CASES) and set(named_run.rows) == {c.name for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace("\n", "\\n") for c in CASES])
def test_each_kind_ends_as_expected(case: Case, folder_run: Run, named_run: Run) -> None:
    _check_row(folder_run.rows.get(case.name), case)
    _check_row(named_run.rows.get(case.name), case)
    assert folder_run.rows[case.name]["prob_pneumonia"] == named_run.rows[case.name]["prob_pneumonia"] \
        or (folder_run.rows[case.name]["prob_pneumonia"] is None) == (
            named_run.rows[case.name]["prob_pneumonia"] is None)


def test_alpha_does_not_change_the_probability(named_run: Run) -> None:
    """Item 12: the same stored film with an alpha channel (opaque, half or mostly transparent)
    gets the probability of the film without one."""
    reference = named_run.rows["alpha_reference.png"]["prob_pneumonia"]
    for name in ("rgba_opaque.png", "rgba_half_transparent.png", "la.png"):
        assert named_run.rows[name]["prob_pneumonia"] == reference, name


def test_a_real_process_prints_no_traceback(tiny_model: Path, corpus: dict[str, Path],
                                            tmp_path: Path) -> None:
    """The console command as a user runs it: a new process, its own stderr, its own encoding."""
    out = tmp_path / "rows.csv"
    env = {**os.environ, "PYTHONPATH": str(Path(pneumoscope.__file__).parents[1]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pneumoscope", "predict", str(tiny_model),
                           str(next(iter(corpus.values())).parent), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    _no_traceback(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert set(_by_name(_read_rows(out))) == {c.name for c in CASES}


def test_explain_on_the_folder_accounts_for_every_file(tiny_model: Path, corpus: dict[str, Path],
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from pneumoscope.explain.cam import explain_files

    rows = explain_files(tiny_model, [next(iter(corpus.values())).parent], tmp_path / "cams",
                         progress=False)
    by_name = _by_name(rows)
    assert len(rows) == len(CASES) and set(by_name) == {c.name for c in CASES}
    for case in CASES:
        row = by_name[case.name]
        assert bool(row["error"]) == (case.expect == "error"), (case.name, row["error"])
    _no_traceback(capsys.readouterr().err)


def test_non_utf8_name_named_explicitly(tiny_model: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / NON_UTF8_NAME
    path.write_bytes(_png(_film(40)))
    run = _predict(capsys, caplog, [str(tiny_model), str(path)], tmp_path / "rows.json")
    _no_traceback(run.err)
    assert run.rc == 0 and run.n_rows == 1


def test_non_utf8_name_in_a_folder_with_csv_output(tiny_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / NON_UTF8_NAME).write_bytes(_png(_film(41)))
    for i in range(3):
        (folder / f"ok{i}.png").write_bytes(_png(_film(42 + i)))
    run = _predict(capsys, caplog, [str(tiny_model), str(folder)], tmp_path / "rows.csv")
    _no_traceback(run.err)
    assert run.rc == 0 and run.n_rows == 4


@pytest.fixture(scope="module")
def fs_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("fs-entries") / "scans"
    folder.mkdir()
    (folder / "good.png").write_bytes(_png(_film(50)))
    return folder, _fs_entries(folder)


@pytest.mark.parametrize("name", ["broken_link.png", "loop.png", "directory.png", "fifo.png",
                                  ".hidden.png", "scan.tif"])
def test_file_system_entries_named_explicitly(name: str, tiny_model: Path, tmp_path: Path,
                                              fs_folder: tuple[Path, dict[str, str]],
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A row, or one error line that names the entry; never a hang (the FIFO) or a traceback."""
    folder, _ = fs_folder
    run = _predict(capsys, caplog, [str(tiny_model), str(folder / name)], tmp_path / "rows.json")
    _no_traceback(run.err)
    if run.n_rows:
        assert set(run.rows) == {name}
    else:
        assert run.rc == 2
        lines = [line for line in run.err.splitlines() if line.startswith("pneumoscope: error:")]
        assert len(lines) == 1 and name in lines[0], run.err


def test_file_system_entries_in_a_folder_do_not_break_the_scan(
        tiny_model: Path, tmp_path: Path, fs_folder: tuple[Path, dict[str, str]],
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = fs_folder
    run = _predict(capsys, caplog, [str(tiny_model), str(folder)], tmp_path / "rows.json")
    _no_traceback(run.err)
    assert "good.png" in run.rows and run.rows["good.png"]["label"] in CLASS_NAMES


def test_file_system_entries_in_a_folder_are_each_accounted_for(
        tiny_model: Path, tmp_path: Path, fs_folder: tuple[Path, dict[str, str]],
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    folder, entries = fs_folder
    run = _predict(capsys, caplog, [str(tiny_model), str(folder)], tmp_path / "rows.json")
    said = run.out + run.err
    missing = [name for name in entries if name not in run.rows and name not in said]
    assert not missing, f"neither a row nor a named skip for {missing}"


# --- tampered model files ----------------------------------------------------------------------

def _retag(src: Path, dst: Path, change: Callable[[dict], object]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = json.loads(fh.metadata()["pneumoscope"])
    new = change(meta)
    save_file(load_file(str(src)), str(dst),
              metadata={"pneumoscope": json.dumps(meta if new is None else new)})


def _set(path: str, value: object) -> Callable[[dict], None]:
    *parents, key = path.split(".")

    def change(meta: dict) -> None:
        for p in parents:
            meta = meta[p]
        meta[key] = value
    return change


def _weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path, Path], None]:
    def write(src: Path, dst: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(src), framework="pt") as fh:
            meta = fh.metadata()
        tensors = load_file(str(src))
        change(tensors)
        save_file(tensors, str(dst), metadata=meta)
    return write


def _bytes(change: Callable[[bytearray], None]) -> Callable[[Path, Path], None]:
    def write(src: Path, dst: Path) -> None:
        data = bytearray(src.read_bytes())
        change(data)
        dst.write_bytes(bytes(data))
    return write


def _nan_bytes(data: bytearray) -> None:
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    mid = header + (len(data) - header) // 2
    data[mid:mid + 64] = b"\xff" * 64  # NaN as float32


def _finite_flips(data: bytearray) -> None:
    """64 weights' lowest mantissa byte flipped: finite, plausible, wrong (only a digest tells)."""
    header = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
    start = header + ((len(data) - header) // 2) // 4 * 4
    for i in range(64):
        data[start + 4 * i] ^= 0x5A


def _meta(change: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    return lambda src, dst: _retag(src, dst, change)


TAMPERED: dict[str, Callable[[Path, Path], None]] = {
    "flipped_header_bytes": _bytes(lambda d: d.__setitem__(slice(0, 8), b"\xff" * 8)),
    "flipped_weight_bytes_nan": _bytes(_nan_bytes),
    "flipped_weight_bytes_finite": _bytes(_finite_flips),
    "threshold_edited_valid": _meta(_set("threshold", 0.7)),
    "truncated": _bytes(lambda d: d.__delitem__(slice(len(d) // 2, None))),
    "not_safetensors": _bytes(lambda d: d.__setitem__(slice(None), b"PK\x03\x04 a zip, not a model")),
    "threshold_nan": _meta(_set("threshold", float("nan"))),
    "threshold_2": _meta(_set("threshold", 2.0)),
    "threshold_abc": _meta(_set("threshold", "abc")),
    "image_size_big": _meta(_set("preprocessing.image_size", "big")),
    "image_size_1000000": _meta(_set("preprocessing.image_size", 1_000_000)),
    "std_zero": _meta(_set("preprocessing.std", [0.0, 0.0, 0.0])),
    "metadata_list": _meta(lambda m: [m]),
    "unknown_field": _meta(_set("bogus", 1)),
    "model_unknown": _meta(_set("model", "resnet19")),
    "model_mismatch": _meta(_set("model", "efficientnet_b0")),
    "arch_kwargs_path": _meta(_set("arch_kwargs", {"checkpoint_path": "/etc/passwd"})),
    "class_names_three": _meta(_set("class_names", ["A", "B", "C"])),
    "gate_garbage": _meta(_set("gate", {"format": "pneumoscope-gate/1", "state": "fitted"})),
    "tensor_missing": _weights(lambda t: t.pop("backbone.fc.weight")),
    "tensor_extra": _weights(lambda t: t.__setitem__("backbone.extra", torch.zeros(3))),
}


@pytest.fixture(scope="module")
def tampered(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tampered")
    files = {}
    for name, write in TAMPERED.items():
        files[name] = folder / f"{name}.safetensors"
        write(tiny_model, files[name])
    return files


@pytest.mark.parametrize("name", list(TAMPERED))
def test_tampered_model_files_fail_in_one_line_naming_the_file(
        name: str, tampered: dict[str, Path], corpus: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    def never(*_: object, **__: object) -> None:
        raise AssertionError("serve started on a damaged model file")

    monkeypatch.setattr(uvicorn, "run", never)
    path = tampered[name]
    for argv in (["predict", str(path), str(corpus["good.png"]), "--out", str(tmp_path / "r.csv")],
                 ["serve", str(path), "--port", "9"]):
        caplog.clear()
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        _no_traceback(err)
        lines = [line for line in err.splitlines() if line.startswith("pneumoscope: error:")]
        assert len(lines) == 1 and str(path) in lines[0], err
        assert not [r for r in caplog.records if r.exc_info]
    assert not (tmp_path / "r.csv").exists()  # nothing that looks like an answer


ISSUE_CASES = ("threshold_abc", "image_size_big", "metadata_list", "unknown_field", "model_mismatch",
               "tensor_missing", "image_size_1000000")
"""The issue's own list, through every other command that reads a model file."""


@pytest.mark.parametrize("command", ["evaluate", "explain", "export"])
def test_other_commands_fail_in_one_line_on_the_issues_cases(
        command: str, tampered: dict[str, Path], corpus: dict[str, Path], kermany_tree: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ISSUE_CASES:
        path = tampered[name]
        argv = {"evaluate": ["evaluate", str(path), "--data", str(kermany_tree), "--out",
                             str(tmp_path / "eval"), "--n-bootstrap", "10"],
                "explain": ["explain", str(path), str(corpus["good.png"]), "--out", str(tmp_path / "cams")],
                "export": ["export", str(path), "--out", str(tmp_path / "m.onnx")]}[command]
        assert main(argv) == 2, (command, name)
        err = capsys.readouterr().err
        _no_traceback(err)
        lines = [line for line in err.splitlines() if line.startswith("pneumoscope: error:")]
        assert len(lines) == 1 and str(path) in lines[0], (name, err)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "cams").exists()


def test_the_untampered_model_still_loads(tiny_model: Path) -> None:
    assert read_info(tiny_model).threshold == pytest.approx(0.4)


# --- the web service ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[object]:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    with TestClient(create_app(tiny_model), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c.name.replace("\n", "\\n") for c in CASES])
def test_service_answers_every_kind_without_5xx(case: Case, corpus: dict[str, Path], client: object,
                                                caplog: pytest.LogCaptureFixture) -> None:
    data = corpus[case.name].read_bytes()
    files = {"file": ("upload", data, "application/octet-stream")}
    predict = client.post("/v1/predict", files=files)  # type: ignore[attr-defined]
    explain = client.post("/v1/explain", files=files)  # type: ignore[attr-defined]
    assert predict.status_code < 500 and explain.status_code < 500, (predict.text, explain.text)
    if case.expect == "error":
        assert predict.status_code in (413, 415, 422) and explain.status_code in (413, 415, 422)
        assert predict.json()["error"] and "\n" not in predict.json()["error"]
    elif case.expect == "refuse":
        assert predict.status_code == 200 and predict.json()["probability"] is None
        assert predict.json()["gate"]["status"] == "refuse"
        assert explain.status_code == 422
    else:
        body = predict.json()
        assert predict.status_code == 200 and 0.0 <= body["probability"] <= 1.0, body
        assert body["label"] in CLASS_NAMES
        assert explain.status_code == 200 and explain.content.startswith(b"\x89PNG")
    assert not [r for r in caplog.records if r.exc_info], "the service logged a traceback"


def test_service_and_command_line_agree_on_formats(named_run: Run, corpus: dict[str, Path],
                                                   client: object) -> None:
    """One rule (data/decode.py): a file the service refuses as unsupported (415) is an error row
    in predict that says so, and the other way round."""
    for case in CASES:
        data = corpus[case.name].read_bytes()
        if not data:  # the service says "the uploaded file is empty" (422) before any decoding
            continue
        status = client.post("/v1/predict",  # type: ignore[attr-defined]
                             files={"file": ("upload", data, "application/octet-stream")}).status_code
        error = named_run.rows[case.name]["error"] or ""
        unsupported = "not a recognised image file" in error or "unsupported file type" in error
        assert (status == 415) == unsupported, (case.name, status, error)
