"""Tests for pneumoscope.data.download: a local HTTP server stands in for Mendeley."""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscope.data import download as dl
from pneumoscope.data.audit import check_dataset, format_report
from pneumoscope.data.download import ArchiveError, ChecksumError, DownloadError, download_kermany

ZIP = dl.ZIP_NAME


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A tiny distinct grayscale JPEG (noise, so no two seeds give the same bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG")
    return buf.getvalue()


KERMANY_FILES = {
    "train/NORMAL/IM-0001-0001.jpeg": 1,
    "train/NORMAL/IM-0002-0001.jpeg": 2,
    "train/PNEUMONIA/person1_bacteria_1.jpeg": 3,
    "train/PNEUMONIA/person2_virus_4.jpeg": 4,
    "test/NORMAL/IM-0100-0001.jpeg": 5,
    "test/PNEUMONIA/person50_bacteria_7.jpeg": 6,
}


def make_zip(
    path: Path, *, top: str = "chest_xray", extra: dict[str, bytes] | None = None
) -> bytes:
    """Write a Kermany-like zip (plus macOS junk) to ``path`` and return its bytes."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        for name, seed in KERMANY_FILES.items():
            zf.writestr(f"{top}/{name}", jpeg_bytes(seed))
        zf.writestr(f"{top}/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr(f"{top}/train/NORMAL/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr(f"__MACOSX/{top}/train/NORMAL/._IM-0001-0001.jpeg", b"\x00\x05\x16\x07")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path.read_bytes()


# --------------------------------------------------------------------------------------------
# a small HTTP server that understands Range (SimpleHTTPRequestHandler does not)


@dataclass
class FakeServer:
    payload: bytes = b""
    honor_range: bool = True
    drop_after: int | None = None  # send only this many body bytes, then hang up
    status: int = 200
    content_type: str = "application/zip"
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    url: str = ""


class RangeHandler(http.server.BaseHTTPRequestHandler):
    state: FakeServer  # set on a per-test subclass

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        state = self.state
        rng = self.headers.get("Range")
        state.requests.append((self.path, rng))
        if state.status != 200:
            self.send_error(state.status)
            return
        data, start = state.payload, 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if state.honor_range and m:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", state.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if state.drop_after is not None:
            self.wfile.write(body[: state.drop_after])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxies (they would swallow 127.0.0.1 requests) and no URL override from the shell."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.delenv(dl.URL_ENV_VAR, raising=False)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    handler = type("Handler", (RangeHandler,), {"state": state})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/{ZIP}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def zip_bytes(tmp_path: Path) -> bytes:
    return make_zip(tmp_path / "source.zip")


def fetch(dest: Path, server: FakeServer, payload: bytes, **kwargs: object) -> Path:
    """download_kermany against the fake server, checking size and hash of ``payload``."""
    options: dict[str, object] = {
        "url": server.url,
        "expected_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "timeout": 5.0,
        "progress": False,
    }
    options.update(kwargs)
    return download_kermany(dest, **options)  # type: ignore[arg-type]


def assert_layout(root: Path) -> None:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == sorted(KERMANY_FILES)  # no __MACOSX, no .DS_Store


# --------------------------------------------------------------------------------------------
# download_kermany


def test_full_download_extracts_layout(tmp_path: Path, server: FakeServer, zip_bytes: bytes):
    server.payload = zip_bytes
    dest = tmp_path / "data"
    root = fetch(dest, server, zip_bytes)
    assert root == dest / "chest_xray"
    assert_layout(root)
    assert (dest / ZIP).read_bytes() == zip_bytes
    assert not (dest / f"{ZIP}.part").exists()
    assert not (dest / "__MACOSX").exists()
    assert server.requests == [(f"/{ZIP}", None)]
    assert check_dataset(root, progress=False).ok


def test_any_top_folder_name_is_accepted(tmp_path: Path, server: FakeServer):
    payload = make_zip(tmp_path / "src.zip", top="ChestXRay2017/chest_xray")
    server.payload = payload
    assert_layout(fetch(tmp_path / "data", server, payload))


def test_resume_sends_range_and_result_is_identical(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes
):
    server.payload = zip_bytes
    dest = tmp_path / "data"
    dest.mkdir()
    half = len(zip_bytes) // 2
    (dest / f"{ZIP}.part").write_bytes(zip_bytes[:half])
    root = fetch(dest, server, zip_bytes)
    assert server.requests == [(f"/{ZIP}", f"bytes={half}-")]
    assert (dest / ZIP).read_bytes() == zip_bytes
    assert_layout(root)


def test_server_that_ignores_range_restarts_from_zero(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes
):
    server.payload, server.honor_range = zip_bytes, False
    dest = tmp_path / "data"
    dest.mkdir()
    # Garbage in the .part: appending the full body to it would corrupt the file.
    (dest / f"{ZIP}.part").write_bytes(b"x" * (len(zip_bytes) // 2))
    fetch(dest, server, zip_bytes)
    assert server.requests[0][1] is not None  # it did ask to resume
    assert (dest / ZIP).read_bytes() == zip_bytes


def test_dropped_connection_keeps_part_and_next_run_resumes(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes
):
    server.payload, server.drop_after = zip_bytes, 1000
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="resume"):
        fetch(dest, server, zip_bytes)
    assert (dest / f"{ZIP}.part").stat().st_size == 1000
    server.drop_after = None
    fetch(dest, server, zip_bytes)
    assert server.requests[-1][1] == "bytes=1000-"
    assert (dest / ZIP).read_bytes() == zip_bytes


def test_complete_part_file_is_not_downloaded_again(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes
):
    server.payload = zip_bytes
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / f"{ZIP}.part").write_bytes(zip_bytes)
    assert_layout(fetch(dest, server, zip_bytes))
    assert server.requests == []


@pytest.mark.parametrize(
    ("field_name", "bad_value", "message"),
    [("sha256", "0" * 64, "sha256"), ("expected_size", 123, "bytes")],
)
def test_checksum_or_size_mismatch_raises_and_leaves_nothing(
    tmp_path: Path,
    server: FakeServer,
    zip_bytes: bytes,
    field_name: str,
    bad_value: object,
    message: str,
):
    server.payload = zip_bytes
    dest = tmp_path / "data"
    with pytest.raises(ChecksumError, match=message):
        fetch(dest, server, zip_bytes, **{field_name: bad_value})
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("bad_name", ["../evil.jpeg", "chest_xray/train/../../evil.jpeg", "/evil"])
def test_zip_slip_member_is_refused(tmp_path: Path, server: FakeServer, bad_name: str):
    payload = make_zip(tmp_path / "src.zip", extra={bad_name: jpeg_bytes(99)})
    server.payload = payload
    dest = tmp_path / "a" / "data"
    with pytest.raises(ArchiveError, match="unsafe"):
        fetch(dest, server, payload)
    assert not (dest / "chest_xray").exists()
    assert not any(p.name == "evil.jpeg" for p in tmp_path.rglob("*"))
    assert not Path("/evil").exists()


def test_zip_without_train_and_test_is_refused(tmp_path: Path, server: FakeServer):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/NORMAL/a.jpeg", jpeg_bytes(1))
    server.payload = path.read_bytes()
    with pytest.raises(ArchiveError, match="train/ and test/"):
        fetch(tmp_path / "data", server, server.payload)


def test_connection_refused_fails_fast_with_offline_hint(tmp_path: Path):
    with socket.socket() as sock:  # bind then close: nothing listens on this port afterwards
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        download_kermany(
            tmp_path, url=f"http://127.0.0.1:{port}/{ZIP}", timeout=30.0, progress=False
        )
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "--data" in message and "paultimothymooney/chest-xray-pneumonia" in message
    assert f"127.0.0.1:{port}" in message


def test_dns_failure_is_a_download_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match=r"cannot resolve data\.example"):
        download_kermany(tmp_path, url="https://data.example/x.zip", progress=False)


def test_hanging_name_lookup_is_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # urlopen's timeout does not bound DNS; the pre-flight check must.
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(3) or [])
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"no answer from data\.example"):
        download_kermany(tmp_path, url="https://data.example/x.zip", timeout=0.3, progress=False)
    assert time.monotonic() - start < 2.5


def test_http_error_is_a_download_error(tmp_path: Path, server: FakeServer):
    server.status = 404
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(tmp_path / "data", server, b"irrelevant")
    assert not (tmp_path / "data" / ZIP).exists()


def test_html_page_instead_of_zip_is_reported(tmp_path: Path, server: FakeServer):
    server.payload, server.content_type = b"<html>please log in</html>", "text/html; charset=utf-8"
    with pytest.raises(DownloadError, match="HTML page"):
        fetch(tmp_path / "data", server, server.payload)
    assert not any((tmp_path / "data").iterdir())


def test_already_extracted_makes_no_request(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes
):
    server.payload = zip_bytes
    dest = tmp_path / "data"
    first = fetch(dest, server, zip_bytes)
    (dest / ZIP).unlink()  # even without the zip, a complete tree is enough
    assert fetch(dest, server, zip_bytes) == first
    assert len(server.requests) == 1


def test_env_var_replaces_default_url(
    tmp_path: Path, server: FakeServer, zip_bytes: bytes, monkeypatch: pytest.MonkeyPatch
):
    server.payload = zip_bytes
    monkeypatch.setenv(dl.URL_ENV_VAR, server.url)
    root = download_kermany(
        tmp_path / "data",
        expected_size=len(zip_bytes),
        sha256=hashlib.sha256(zip_bytes).hexdigest(),
        progress=False,
    )
    assert_layout(root)
    assert len(server.requests) == 1


def test_bad_arguments_name_the_value(tmp_path: Path):
    with pytest.raises(ValueError, match="'abc'"):
        download_kermany(tmp_path, sha256="abc")
    with pytest.raises(ValueError, match="-1"):
        download_kermany(tmp_path, timeout=-1)


# --------------------------------------------------------------------------------------------
# check_dataset


@pytest.fixture
def messy_root(tmp_path: Path) -> Path:
    root = tmp_path / "chest_xray"
    files = {
        "train/NORMAL/IM-0001-0001.jpeg": jpeg_bytes(1),
        "train/NORMAL/IM-0001-0002.jpeg": jpeg_bytes(2),
        "train/NORMAL/IM-0002-0001.jpeg": jpeg_bytes(3),
        "train/PNEUMONIA/person1_bacteria_1.jpeg": jpeg_bytes(4),
        "train/PNEUMONIA/person1_bacteria_2.jpeg": jpeg_bytes(4),  # duplicate within train
        "train/PNEUMONIA/person2_virus_3.jpeg": jpeg_bytes(5),
        "test/NORMAL/IM-0100-0001.jpeg": jpeg_bytes(6),
        "test/NORMAL/IM-0200-0001.jpeg": jpeg_bytes(1),  # copy of a train image: leakage
        "test/PNEUMONIA/person2_bacteria_9.jpeg": jpeg_bytes(7),  # person2 also in train
        "test/PNEUMONIA/person3_bacteria_10.jpeg": np.random.default_rng(0).bytes(500),
        "test/PNEUMONIA/person4_virus_11.jpeg": b"",
        "test/PNEUMONIA/notes.txt": b"not an image",
        "test/PNEUMONIA/.DS_Store": b"\x00\x00\x00\x01Bud1",  # macOS noise: not reported
        "val/PNEUMONIA/person5_virus_12.jpeg": jpeg_bytes(8),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "val" / "NORMAL").mkdir()
    return root


def test_check_dataset_reports_every_problem(messy_root: Path):
    report = check_dataset(messy_root, progress=False, workers=2)
    counts = {(c.split, c.class_name): (c.images, c.patients) for c in report.counts}
    assert counts[("train", "NORMAL")] == (3, 2)
    assert counts[("train", "PNEUMONIA")] == (3, 2)
    assert counts[("test", "PNEUMONIA")] == (3, 3)
    assert counts[("val", "NORMAL")] == (0, 0)

    by_paths = {g.paths: g for g in report.duplicates}
    leak = by_paths[("test/NORMAL/IM-0200-0001.jpeg", "train/NORMAL/IM-0001-0001.jpeg")]
    assert leak.crosses_splits and leak.splits == ("test", "train")
    within = by_paths[
        ("train/PNEUMONIA/person1_bacteria_1.jpeg", "train/PNEUMONIA/person1_bacteria_2.jpeg")
    ]
    assert not within.crosses_splits
    assert report.leaking_duplicates == (leak,)
    assert len(report.duplicates) == 2  # the empty file is not a 'duplicate' of anything

    unreadable = dict(report.unreadable)
    assert set(unreadable) == {
        "test/PNEUMONIA/person3_bacteria_10.jpeg",
        "test/PNEUMONIA/person4_virus_11.jpeg",
    }
    assert "0 bytes" in unreadable["test/PNEUMONIA/person4_virus_11.jpeg"]
    assert report.empty_class_folders == ("val/NORMAL",)
    assert report.non_image_files == ("test/PNEUMONIA/notes.txt",)
    assert report.patients_in_several_splits == (("person2", ("test", "train")),)
    assert not report.ok

    text = format_report(report)
    for needle in (
        "LEAK test+train",
        "person3_bacteria_10.jpeg",
        "0 bytes",
        "val/NORMAL",
        "notes.txt",
        "person2 (test, train)",
        "PROBLEMS FOUND",
    ):
        assert needle in text, needle


def test_check_dataset_missing_class_folder_and_missing_root(tmp_path: Path):
    root = tmp_path / "flat"
    (root / "NORMAL").mkdir(parents=True)
    (root / "NORMAL" / "IM-0001-0001.jpeg").write_bytes(jpeg_bytes(1))
    report = check_dataset(root, progress=False)
    assert [c.split for c in report.counts] == ["all", "all"]
    assert report.empty_class_folders == ("PNEUMONIA (missing)",)
    with pytest.raises(FileNotFoundError, match="nope"):
        check_dataset(tmp_path / "nope")


def _unpack_local(tmp_path: Path, extra: dict[str, bytes]) -> Path:
    """``download_kermany`` on a zip already in the destination (no network)."""
    dest = tmp_path / "data"
    dest.mkdir()
    make_zip(dest / ZIP, extra=extra)
    return download_kermany(dest, expected_size=None, sha256=None, progress=False)


@pytest.mark.parametrize(("extra", "message"), [
    # Two members equal but for case: on a case-insensitive disk one overwrites the other, and
    # the split folder is lower-cased on extraction anyway.
    ({"chest_xray/train/NORMAL/im-0001-0001.JPEG": jpeg_bytes(7)}, "differ only in case"),
    ({"chest_xray/TRAIN/NORMAL/IM-0001-0001.jpeg": jpeg_bytes(7)}, "differ only in case"),
    # A file and a folder of the same name.
    ({"chest_xray/train/NORMAL/IM-0001-0001.jpeg/x.jpeg": jpeg_bytes(7)}, "is a file, and a folder"),
    ({"chest_xray/train/NORMAL/sub": jpeg_bytes(7), "chest_xray/train/NORMAL/SUB/x.jpeg": jpeg_bytes(8)},
     "is a file, and a folder"),
])
def test_members_that_would_overwrite_each_other_are_refused(tmp_path: Path, extra: dict[str, bytes],
                                                             message: str) -> None:
    with pytest.raises(ArchiveError, match=message) as info:
        _unpack_local(tmp_path, extra)
    assert ZIP in str(info.value)
    assert not (tmp_path / "data" / "chest_xray").exists()
    assert not (tmp_path / "data" / ".chest_xray.partial").exists()


def test_zip_bomb_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 MiB of zeros deflates to ~64 KiB; the cap is lowered so the test stays small.
    monkeypatch.setattr(dl, "MAX_UNCOMPRESSED_BYTES", 32 * 2**20)
    dest = tmp_path / "data"
    dest.mkdir()
    make_zip(dest / ZIP)
    with zipfile.ZipFile(dest / ZIP, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("chest_xray/train/NORMAL/IM-0999-0001.jpeg", bytes(64 * 2**20))
    assert (dest / ZIP).stat().st_size < 2**20
    with pytest.raises(ArchiveError, match=r"unpack to \d+ bytes, above the limit of 33554432"):
        download_kermany(dest, expected_size=None, sha256=None, progress=False)
    assert not (dest / "chest_xray").exists() and not (dest / ".chest_xray.partial").exists()
    monkeypatch.setattr(dl, "MAX_UNCOMPRESSED_BYTES", 128 * 2**20)
    assert download_kermany(dest, expected_size=None, sha256=None, progress=False).is_dir()
