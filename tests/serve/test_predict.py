from __future__ import annotations

import csv
import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_dicom
from pneumoscope.cli import main
from pneumoscope.data.decode import ImageDecodeError
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
from pneumoscope.models.factory import build_model
from pneumoscope.serve.predict import (
    PredictionRow,
    Predictor,
    collect_inputs,
    predict_to_file,
    scan_inputs,
    write_rows,
)
from pneumoscope.serve.results import partial_path

GOOD = ("a.jpeg", "b.png", "c16.png", "d.dcm", "sub/e.png")
BAD = ("corrupt.jpeg", "empty.png", "text.png", "huge.png")


def make_checkpoint(path: Path) -> Path:
    """A random resnet18 at 48 px whose head is scaled up so probabilities differ per image."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=48).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.4)
    return save_checkpoint(path, model, info)


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` (the pixel data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def write_inputs(root: Path) -> Path:
    """Good JPEG/PNG/16-bit PNG/DICOM files and bad ones (corrupt, empty, text, absurd size)."""
    rng = np.random.default_rng(0)
    phantoms = [make_phantom(rng, 64, pneumonia=i % 2 == 1) for i in range(5)]
    (root / "sub").mkdir(parents=True)
    Image.fromarray(phantoms[0]).save(root / "a.jpeg", quality=95)
    Image.fromarray(phantoms[1]).convert("RGB").save(root / "b.png")
    Image.fromarray(phantoms[2].astype(np.uint16) * 257).save(root / "c16.png")
    write_dicom(root / "d.dcm", phantoms[3].astype(np.uint16) * 16)
    Image.fromarray(phantoms[4]).save(root / "sub" / "e.png")
    (root / "corrupt.jpeg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(300))
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is a text file, renamed\n")
    (root / "huge.png").write_bytes(png_with_header(100_000, 100_000))
    (root / "notes.txt").write_text("not an image suffix: a folder scan skips it\n")
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("inputs") / "scans")


@pytest.fixture(scope="module")
def predictor(ckpt: Path) -> Predictor:
    return Predictor(ckpt)


def test_collect_inputs(inputs: Path) -> None:
    found = collect_inputs([str(inputs), str(inputs / "a.jpeg"), str(inputs / "sub" / "*.png")])
    names = [p.relative_to(inputs).as_posix() for p in found]
    assert sorted(names) == sorted(GOOD + BAD) and len(set(names)) == len(names)
    assert [str(p) for p in found] == sorted(str(p) for p in found)
    assert collect_inputs([str(inputs / "*.jpeg")]) == [inputs / "a.jpeg", inputs / "corrupt.jpeg"]
    assert collect_inputs([str(inputs / "notes.txt")]) == [inputs / "notes.txt"]  # named: kept
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        collect_inputs([str(inputs / "nope.png")])
    with pytest.raises(ValueError, match=r"\*\.gif: no files match"):
        collect_inputs([str(inputs / "*.gif")])


def test_predict_files_rows_and_errors(predictor: Predictor, inputs: Path) -> None:
    paths = collect_inputs([str(inputs)])
    rows = predictor.predict_files(paths, batch_size=3, progress=False)
    assert [r.path for r in rows] == [str(p) for p in paths]
    by_name = {Path(r.path).relative_to(inputs).as_posix(): r for r in rows}
    for name in GOOD:
        r = by_name[name]
        assert r.error is None and 0.0 <= r.prob_pneumonia <= 1.0, r
        assert r.label == ("PNEUMONIA" if r.prob_pneumonia >= 0.4 else "NORMAL")
        assert r.threshold == pytest.approx(0.4) and r.model == "resnet18"
    for name in BAD:
        r = by_name[name]
        assert r.prob_pneumonia is None and r.label is None and name in r.error, r
    assert "above the limit" in by_name["huge.png"].error or "too large" in by_name["huge.png"].error
    probs = [by_name[n].prob_pneumonia for n in GOOD]
    assert np.ptp(probs) > 1e-3  # the scaled-up head gives different probabilities
    # Same probabilities whatever the batching, and through predict_images / predict_bytes.
    again = predictor.predict_files([inputs / n for n in GOOD], batch_size=32, progress=False)
    np.testing.assert_allclose([r.prob_pneumonia for r in again], probs, atol=1e-6)
    row = predictor.predict_bytes((inputs / "a.jpeg").read_bytes(), name="upload.jpeg")
    assert row.path == "upload.jpeg" and row.prob_pneumonia == pytest.approx(probs[0], abs=1e-6)
    with pytest.raises(ImageDecodeError, match=r"upload\.txt"):
        predictor.predict_bytes(b"hello", name="upload.txt")


def test_predict_images_checks_input(predictor: Predictor) -> None:
    rng = np.random.default_rng(1)
    imgs = [make_phantom(rng, 48), make_phantom(rng, 100)]  # resized to 48 inside
    assert predictor.predict_images(imgs).shape == (2,)
    with pytest.raises(ValueError, match="2-D uint8"):
        predictor.predict_images([np.zeros((48, 48), np.float32)])


def test_concurrent_calls_match_sequential(predictor: Predictor) -> None:
    rng = np.random.default_rng(2)
    images = [make_phantom(rng, 48, pneumonia=i % 2 == 1) for i in range(8)]
    expected = predictor.predict_images(images, batch_size=3)
    results: dict[int, list[np.ndarray]] = {}

    def work(k: int) -> None:
        results[k] = [predictor.predict_images(images[k:] + images[:k], batch_size=3)
                      for _ in range(3)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, outs in results.items():
        for out in outs:
            np.testing.assert_allclose(out, np.roll(expected, -k), atol=1e-6)
    assert len(results) == 4


def test_cli_predict_csv_json_and_exit_status(ckpt: Path, inputs: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out_csv = tmp_path / "results.csv"
    assert main(["predict", str(ckpt), str(inputs), "--out", str(out_csv), "--batch-size", "4"]) == 1
    printed = capsys.readouterr().out
    assert f"{len(GOOD) + len(BAD)} file(s), {len(BAD)} failed" in printed and str(out_csv) in printed
    with out_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(GOOD) + len(BAD)
    assert list(rows[0]) == ["path", "prob_pneumonia", "label", "threshold", "model", "error", "gate",
                             "gate_reason", "ood_score"]
    assert sum(bool(r["error"]) for r in rows) == len(BAD)
    # A model file from before the gate: the deterministic checks run, the phantoms pass them.
    assert {r["gate"] for r in rows if not r["error"]} == {"ok"}
    assert all(0 <= float(r["prob_pneumonia"]) <= 1 for r in rows if not r["error"])

    out_json = tmp_path / "good.json"
    good_glob = str(inputs / "*.png")  # b.png, c16.png + bad PNGs: use the good ones only
    assert main(["predict", str(ckpt), str(inputs / "b.png"), str(inputs / "c16.png"),
                 str(inputs / "sub"), "--out", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert [Path(r["path"]).name for r in data] == ["b.png", "c16.png", "e.png"]
    assert all(r["error"] is None and r["label"] in ("NORMAL", "PNEUMONIA") for r in data)
    assert main(["predict", str(ckpt), good_glob]) == 1  # the glob also takes the bad PNGs
    table = capsys.readouterr().out
    assert "p(pneumonia)" in table and "ERROR:" in table and "5 file(s), 3 failed" in table


@pytest.mark.parametrize(("argv", "message"), [
    (["predict", "{ckpt}", "{inputs}", "--out", "x.txt"], "must end in .csv, .jsonl, .json"),
    (["predict", "{inputs}/a.jpeg", "{inputs}/b.png"], "not a PneumoScope checkpoint"),
    (["predict", "{ckpt}", "{inputs}", "--shard", "4/4"], "--shard must be I/N"),
    (["predict", "{ckpt}", "{inputs}", "--resume"], "need --out"),
    (["predict", "{ckpt}", "{inputs}", "--decode-workers", "-1"], "--decode-workers must be >= 0"),
])
def test_cli_predict_bad_arguments_exit_2(argv: list[str], message: str, ckpt: Path, inputs: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(ckpt=ckpt, inputs=inputs) for a in argv]) == 2
    assert message in capsys.readouterr().err


def test_write_rows_rejects_unknown_suffix(tmp_path: Path) -> None:
    row = PredictionRow("x.png", 0.7, "PNEUMONIA", 0.5, "resnet18")
    assert write_rows([row], tmp_path / "r.json").is_file()
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl, \.json"):
        write_rows([row], tmp_path / "r.xlsx")


def test_cli_predict_writes_heatmaps_for_the_good_files(ckpt: Path, inputs: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytorch_grad_cam")
    heatmaps = tmp_path / "cams"
    assert main(["predict", str(ckpt), str(inputs / "b.png"), str(inputs / "sub"),
                 "--heatmaps", str(heatmaps)]) == 0
    assert sorted(p.name for p in heatmaps.iterdir()) == [
        "b_gradcam.npy", "b_gradcam.png", "e_gradcam.npy", "e_gradcam.png"]
    assert np.load(heatmaps / "b_gradcam.npy").ndim == 2


# --- many files: streaming, resume, shards, odd names ------------------------------------------

N_MANY = 10


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten small good films."""
    root = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(3)
    for i in range(N_MANY):
        Image.fromarray(make_phantom(rng, 64, pneumonia=i % 2 == 1)).save(root / f"f{i:02d}.png")
    return root


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _rows_of(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        return _csv_rows(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return json.loads(path.read_text(encoding="utf-8"))


def test_iter_predict_reads_ahead_one_batch_only(predictor: Predictor, many: Path) -> None:
    pulled = 0

    def paths():
        nonlocal pulled
        for p in sorted(many.iterdir()):
            pulled += 1
            yield p

    batches = predictor.iter_predict(paths(), batch_size=3, decode_workers=2)
    assert len(next(batches)) == 3
    assert pulled == 6  # this batch, and the next one decoding: memory is a few batches, not N
    assert sum(len(b) for b in batches) == N_MANY - 3 and pulled == N_MANY


def test_decode_workers_0_gives_the_same_rows(predictor: Predictor, many: Path) -> None:
    paths = sorted(many.iterdir())
    seq = predictor.predict_files(paths, batch_size=4, progress=False, decode_workers=0)
    pooled = predictor.predict_files(paths, batch_size=4, progress=False, decode_workers=3)
    assert [r.to_dict() for r in seq] == [r.to_dict() for r in pooled]


def test_one_file_decodes_in_the_calling_thread(predictor: Predictor, many: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    first = sorted(many.iterdir())[0]
    want = predictor.predict_files([first], batch_size=4, progress=False, decode_workers=0)

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a decode thread pool for one file")

    monkeypatch.setattr("pneumoscope.serve.predict.ThreadPoolExecutor", no_pool)
    got = predictor.predict_files([first], batch_size=4, progress=False)  # default: workers
    assert [r.to_dict() for r in got] == [r.to_dict() for r in want]
    with pytest.raises(AssertionError, match="thread pool"):  # two files still overlap
        predictor.predict_files(sorted(many.iterdir())[:2], batch_size=1, progress=False)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_interrupted_run_keeps_its_rows_and_resumes_without_duplicates(
        predictor: Predictor, many: Path, tmp_path: Path, suffix: str) -> None:
    entries = scan_inputs([many]).entries
    out = tmp_path / f"results{suffix}"
    calls = 0

    def die_after_two(rows: list[PredictionRow]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt  # as a kill between batches: two batches are on disk

    with pytest.raises(KeyboardInterrupt):
        predict_to_file(predictor, entries, out, batch_size=3, on_batch=die_after_two)
    on_disk = out if suffix != ".json" else partial_path(out)
    assert len(_rows_of(on_disk)) == 6
    assert suffix != ".json" or not out.exists()  # the array appears complete or not at all
    counts = predict_to_file(predictor, entries, out, resume=True, batch_size=3)
    assert (counts.already_done, counts.rows) == (6, N_MANY - 6)
    rows = _rows_of(out)
    assert sorted(r["path"] for r in rows) == sorted(str(e.path) for e in entries)
    assert not partial_path(out).exists()
    if suffix == ".csv":
        assert out.read_text().count("path,prob_pneumonia") == 1  # one header
    whole = {r.path: r.prob_pneumonia for r in predictor.predict_files(
        [e.path for e in entries], progress=False)}
    for r in rows:
        assert float(r["prob_pneumonia"]) == pytest.approx(whole[r["path"]], abs=1e-6)
    # Nothing left to do: a second resume writes nothing.
    again = predict_to_file(predictor, entries, out, resume=True, batch_size=3)
    assert (again.already_done, again.rows) == (N_MANY, 0) and len(_rows_of(out)) == N_MANY


def test_resume_refuses_another_models_file(predictor: Predictor, many: Path, tmp_path: Path) -> None:
    out = write_rows([PredictionRow(str(many / "f00.png"), 0.2, "NORMAL", 0.5, "densenet121")],
                     tmp_path / "other.csv")
    with pytest.raises(ValueError, match="another model"):
        predict_to_file(predictor, scan_inputs([many]).entries, out, resume=True)


def test_cli_checks_the_output_before_any_work(many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # The model file does not exist: an --out error first means nothing was loaded or predicted.
    absent = str(tmp_path / "no-model.safetensors")
    existing = tmp_path / "old.csv"
    existing.write_text("kept\n")
    cases = [(str(tmp_path), "is a folder"), (str(tmp_path / "nope" / "r.csv"), "does not exist"),
             (str(existing), "already exists: --resume to continue it, --overwrite")]
    for out, message in cases:
        assert main(["predict", absent, str(many), "--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert existing.read_text() == "kept\n"
    from pneumoscope.serve import results

    monkeypatch.setattr(results.os, "access", lambda path, mode: False)  # root can write anywhere
    assert main(["predict", absent, str(many), "--out", str(tmp_path / "r.csv")]) == 2
    assert "permission denied" in capsys.readouterr().err


def test_cli_resume_overwrite_and_shards(ckpt: Path, many: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.csv"
    assert main(["predict", str(ckpt), str(many / "f0[0-3].png"), "--out", str(out)]) == 0
    assert len(_csv_rows(out)) == 4
    assert main(["predict", str(ckpt), str(many), "--out", str(out), "--resume"]) == 0
    assert f"{N_MANY - 4} file(s), 0 failed" in capsys.readouterr().out
    paths = [r["path"] for r in _csv_rows(out)]
    assert sorted(paths) == sorted(str(p) for p in many.iterdir()) and len(set(paths)) == N_MANY
    assert main(["predict", str(ckpt), str(many / "f00.png"), "--out", str(out), "--overwrite"]) == 0
    assert [Path(r["path"]).name for r in _csv_rows(out)] == ["f00.png"]
    parts = []
    for i in range(3):
        part = tmp_path / f"part-{i}.jsonl"
        assert main(["predict", str(ckpt), str(many), "--shard", f"{i}/3", "--out", str(part)]) == 0
        parts.append([r["path"] for r in _rows_of(part)])
    assert sorted(p for part in parts for p in part) == sorted(str(p) for p in many.iterdir())


def test_cli_odd_file_names_never_break_the_output(ckpt: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    img = Image.fromarray(make_phantom(np.random.default_rng(4), 64))
    img.save(folder / os.fsdecode(b"bad\xff.png"))
    img.save(folder / "new\nline.png")
    (folder / os.fsdecode(b"corrupt\xfe.png")).write_bytes(b"\x89PNG garbage")
    for suffix in (".csv", ".jsonl", ".json"):
        out = tmp_path / f"odd{suffix}"
        assert main(["predict", str(ckpt), str(folder), "--out", str(out)]) == 1  # the corrupt one
        rows = {Path(r["path"]).name: r for r in _rows_of(out)}
        assert set(rows) == {"bad\\xff.png", "new\\nline.png", "corrupt\\xfe.png"}, rows
        assert rows["corrupt\\xfe.png"]["error"].startswith(str(folder / "corrupt\\xfe.png"))
        assert not rows["bad\\xff.png"]["error"]
        if suffix == ".csv":
            assert len(out.read_text(encoding="utf-8").splitlines()) == 4  # one line per row
    capsys.readouterr()
    assert main(["predict", str(ckpt), str(folder)]) == 1  # the table on stdout
    table = capsys.readouterr().out
    assert "bad\\xff.png" in table and "new\\nline.png" in table and "3 file(s), 1 failed" in table


def test_cli_folder_scan_gives_rows_for_links_and_fifos(ckpt: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "links"
    folder.mkdir()
    Image.fromarray(make_phantom(np.random.default_rng(5), 64)).save(folder / "ok.png")
    (folder / "broken.png").symlink_to(folder / "gone.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "notes.txt").write_text("x")
    out = tmp_path / "links.csv"
    status: list[int] = []
    worker = threading.Thread(target=lambda: status.append(main(["predict", str(ckpt), str(folder),
                                                                 "--out", str(out)])), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "predict blocked on the FIFO"
    assert status == [1]
    rows = {Path(r["path"]).name: r["error"] for r in _csv_rows(out)}
    assert set(rows) == {"ok.png", "broken.png", "pipe.png"} and not rows["ok.png"]
    assert "broken symbolic link" in rows["broken.png"] and "FIFO" in rows["pipe.png"]
    assert "1 skipped as not images" in capsys.readouterr().out


def test_predict_files_never_opens_a_fifo(predictor: Predictor, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    rows: list[PredictionRow] = []
    worker = threading.Thread(target=lambda: rows.extend(predictor.predict_files(
        [tmp_path / "pipe.png", tmp_path / "gone.png", tmp_path], progress=False)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "predict_files blocked on the FIFO"
    assert ["FIFO" in rows[0].error, "input not found" in rows[1].error, "a folder" in rows[2].error] == [
        True, True, True]


def test_draft_decode_gives_nearly_the_full_decode_rows(ckpt: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    for i in range(3):
        big = Image.fromarray(make_phantom(rng, 64, pneumonia=i == 1)).resize(
            (900, 760), Image.Resampling.BICUBIC)
        big.save(tmp_path / f"big{i}.jpeg", quality=92)
    paths = sorted(tmp_path.glob("*.jpeg"))
    draft = Predictor(ckpt).predict_files(paths, progress=False)
    full = Predictor(ckpt, draft=False).predict_files(paths, progress=False)
    for d, f in zip(draft, full, strict=True):
        assert d.prob_pneumonia is not None and f.prob_pneumonia is not None
        assert abs(d.prob_pneumonia - f.prob_pneumonia) < 0.02
        assert (d.gate, d.gate_reason) == (f.gate, f.gate_reason)
