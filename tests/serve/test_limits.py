"""The service under absurd shapes, slow and abandoned clients, and foreign Host headers
(issue #13, items 1, 5 and 7). The connection-level limits run against a real uvicorn server
on 127.0.0.1 in a thread, with timeouts of about a second."""

from __future__ import annotations

import io
import logging
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web service needs the serve extra")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

import httpx
import uvicorn
from fastapi.testclient import TestClient
from test_predict import make_checkpoint

from pneumoscope.guard.gate import Gate
from pneumoscope.serve.app import create_app, uvicorn_options
from pneumoscope.serve.limits import ServeLimits, default_allowed_hosts

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("limits-ckpt") / "model.safetensors")


def _png(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.linspace(30, 220, height * width).reshape(height, width).astype(np.uint8)).save(
        buf, format="PNG")
    return buf.getvalue()


# --- item 1: shapes ----------------------------------------------------------------------------


def test_absurd_aspect_ratios_get_422_on_every_endpoint(ckpt: Path) -> None:
    app = create_app(ckpt)
    app.state.service.predictor.gate = Gate.disabled()  # the refusal must not depend on the gate
    with TestClient(app) as client:
        for shape in ((3000, 8), (8, 3000)):
            for path in ("/v1/predict", "/v1/explain", "/v1/preview"):
                r = client.post(path, files={"file": ("s.png", _png(*shape), "image/png")})
                assert r.status_code == 422, (path, shape, r.text)
                assert "aspect ratio above 20:1" in r.json()["error"]
        # 20:1 is legal: the preview of a 2000 x 100 image is bounded (enlarged at most to 1024).
        r = client.post("/v1/preview", files={"file": ("s.png", _png(2000, 100), "image/png")})
        assert r.status_code == 200 and max(Image.open(io.BytesIO(r.content)).size) <= 1024


def test_explaining_a_long_image_without_the_gate_stays_small(ckpt: Path) -> None:
    # 4000 x 200 (20:1), gate off: the old code enlarged the 512 x 26 display copy to 256 px wide
    # (256 x 5041) and built float64 colour arrays over it. Now the overlay is at most 1024 long,
    # and past the decode only the model input and the display copy are kept.
    app = create_app(ckpt)
    service = app.state.service
    service.predictor.gate = Gate.disabled()
    data = _png(4000, 200)
    service.explain(data, "gradcam", True)  # warm-up: lazy imports, font loading
    tracemalloc.start()
    try:
        _, png = service.explain(data, "gradcam", True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    decoded_bytes = 4000 * 200
    assert peak < decoded_bytes + 6 * 2**20, f"explain peak {peak / 2**20:.1f} MiB"
    assert max(Image.open(io.BytesIO(png)).size) <= 1024 + 16


# --- item 7: Host header -----------------------------------------------------------------------


def test_default_allowed_hosts() -> None:
    assert default_allowed_hosts("127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert default_allowed_hosts("::1") == ["127.0.0.1", "localhost", "[::1]"]
    assert default_allowed_hosts("0.0.0.0") == ["127.0.0.1", "localhost", "[::1]"]
    assert default_allowed_hosts("xray-box.lan")[-1] == "xray-box.lan"
    assert default_allowed_hosts("fd00::5")[-1] == "[fd00::5]"


@pytest.mark.parametrize(("host", "status"), [
    ("127.0.0.1:8000", 200), ("localhost:8000", 200), ("LOCALHOST", 200), ("[::1]:8000", 200),
    ("xray-box.lan:8000", 200), ("evil.example", 400), ("evil.example:8000", 400),
    ("127.0.0.1.evil.example", 400), ("", 400)])
def test_only_the_bound_host_names_are_answered(ckpt: Path, host: str, status: int) -> None:
    app = create_app(ckpt, allowed_hosts=default_allowed_hosts("xray-box.lan"))
    with TestClient(app) as client:
        r = client.get("/healthz", headers={"Host": host})
        assert r.status_code == status
        r = client.post("/v1/predict", headers={"Host": host},
                        files={"file": ("a.png", _png(64, 64), "image/png")})
        assert r.status_code == status


def test_any_host_when_asked(ckpt: Path) -> None:
    with TestClient(create_app(ckpt, allowed_hosts=["*"])) as client:
        assert client.get("/healthz", headers={"Host": "whatever.example"}).status_code == 200


# --- item 5: limits, options -------------------------------------------------------------------


def test_limits_are_checked() -> None:
    for kwargs, name in [({"max_uploads": 0}, "max_uploads"), ({"body_timeout_s": 0}, "body_timeout_s"),
                         ({"header_timeout_s": float("nan")}, "header_timeout_s"),
                         ({"keep_alive_s": float("inf")}, "keep_alive_s"),
                         ({"max_uploads": 8, "max_connections": 8}, "max_connections")]:
        with pytest.raises(ValueError, match=name):
            ServeLimits(**kwargs)


def test_cli_serve_passes_the_limits_to_uvicorn(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pneumoscope.cli import main

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", str(ckpt), "--port", "8124", "--max-uploads", "3", "--body-timeout", "7",
                 "--header-timeout", "4", "--keep-alive", "2", "--max-connections", "9",
                 "--allowed-hosts", "a.lan, b.lan"]) == 0
    assert seen["limit_concurrency"] == 9 and seen["timeout_keep_alive"] == 2
    assert seen["h11_max_incomplete_event_size"] == ServeLimits().max_header_bytes
    service = seen["app"].state.service
    assert service.limits == ServeLimits(max_uploads=3, body_timeout_s=7, header_timeout_s=4,
                                         keep_alive_s=2, max_connections=9)
    with TestClient(seen["app"]) as client:
        assert client.get("/healthz", headers={"Host": "b.lan"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "127.0.0.1"}).status_code == 400
    seen.clear()
    assert main(["serve", str(ckpt)]) == 0  # the defaults: loopback names only
    with TestClient(seen["app"]) as client:
        assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        assert client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 400
    assert main(["serve", str(ckpt), "--max-uploads", "0"]) == 2


# --- item 5: a real server ---------------------------------------------------------------------


LIMITS = ServeLimits(max_uploads=2, body_timeout_s=1.5, header_timeout_s=1.0, keep_alive_s=1.0,
                     max_connections=8)


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[tuple[str, int]]:
    app = create_app(ckpt, limits=LIMITS, allowed_hosts=default_allowed_hosts(HOST))
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    # log_config=None: uvicorn's loggers propagate, so caplog sees every line the server logs.
    config = uvicorn.Config(app, host=HOST, port=port, log_config=None, **uvicorn_options(LIMITS))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield HOST, port
    srv.should_exit = True
    thread.join(timeout=10)


def _head(port: int, length: int) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary=XyZ\r\nContent-Length: {length}\r\n\r\n").encode()


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def _uploads_in_progress(port: int) -> int:
    return httpx.get(f"http://{HOST}:{port}/healthz", timeout=5).json()["uploads_in_progress"]


def test_slow_headers_are_cut_off(server: tuple[str, int]) -> None:
    _, port = server
    with socket.create_connection((HOST, port)) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        assert _read_all(sock, 10) == b""  # closed by the server
        assert 0.8 < time.monotonic() - start < 5


def test_a_slow_body_gets_408(server: tuple[str, int]) -> None:
    _, port = server
    with socket.create_connection((HOST, port)) as sock:
        start = time.monotonic()
        sock.sendall(_head(port, 10_000) + b"--XyZ\r\n")
        for _ in range(4):  # a byte now and then: never idle, never done
            time.sleep(0.5)
            try:
                sock.sendall(b"x")
            except OSError:
                break
        answer = _read_all(sock, 10)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload too slow" in answer and time.monotonic() - start < 6


def test_uploads_beyond_the_limit_get_503_before_their_body(server: tuple[str, int]) -> None:
    _, port = server
    slow = [socket.create_connection((HOST, port)) for _ in range(LIMITS.max_uploads)]
    try:
        for sock in slow:
            sock.sendall(_head(port, 10_000) + b"--XyZ\r\n")
        deadline = time.monotonic() + 5
        while _uploads_in_progress(port) < LIMITS.max_uploads:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(f"http://{HOST}:{port}/v1/predict", files={"file": ("a.png", _png(64, 64))},
                       timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and "busy" in r.json()["error"]
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 5
    while _uploads_in_progress(port):  # the slots come back when the clients go
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = httpx.post(f"http://{HOST}:{port}/v1/predict", files={"file": ("a.png", _png(64, 64))}, timeout=30)
    assert r.status_code == 200


def test_a_client_leaving_mid_upload_costs_one_log_line(server: tuple[str, int],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    _, port = server
    caplog.set_level(logging.INFO)
    with socket.create_connection((HOST, port)) as sock:
        sock.sendall(_head(port, 100_000) + b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; "
                     b"filename=\"a.png\"\r\n\r\n" + b"\x89PNG" + b"\0" * 1000)
        deadline = time.monotonic() + 5
        while _uploads_in_progress(port) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 5
    while _uploads_in_progress(port):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.2)
    gone = [r for r in caplog.records if "disconnected during the upload" in r.getMessage()]
    assert len(gone) == 1 and gone[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert httpx.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code == 200


def test_cli_predict_gives_a_per_file_error_for_a_sliver(ckpt: Path, tmp_path: Path) -> None:
    from pneumoscope.cli import main

    (tmp_path / "sliver.png").write_bytes(_png(3000, 8))
    (tmp_path / "film.png").write_bytes(_png(64, 64))
    out = tmp_path / "out.csv"
    main(["predict", str(ckpt), str(tmp_path / "sliver.png"), str(tmp_path / "film.png"), "--no-gate",
          "--out", str(out)])
    rows = {line.split(",")[0].rsplit("/", 1)[-1]: line for line in out.read_text().splitlines()[1:]}
    assert "aspect ratio above 20:1" in rows["sliver.png"]
    assert "aspect ratio" not in rows["film.png"]
    assert "NORMAL" in rows["film.png"] or "PNEUMONIA" in rows["film.png"]
