"""The web service through FastAPI's TestClient: good formats, every kind of bad input, the model
card, explanations and concurrent requests. Images are synthetic phantoms; no network."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the web service needs the serve extra")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient
from test_predict import make_checkpoint, png_with_header, write_dicom

from pneumoscope.data.synthetic import make_phantom
from pneumoscope.serve.app import create_app

MAX_UPLOAD = 200_000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("app-ckpt") / "model.safetensors")


@pytest.fixture(scope="module")
def client(ckpt: Path) -> TestClient:
    app = create_app(ckpt, max_upload_bytes=MAX_UPLOAD, max_pixels=2_000_000)
    with TestClient(app) as c:
        yield c


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    phantoms = [make_phantom(rng, 96, pneumonia=i % 2 == 1) for i in range(4)]
    dcm = write_dicom(tmp_path_factory.mktemp("app-dcm") / "x.dcm", phantoms[3].astype(np.uint16) * 16)
    return {
        "jpeg": _encode(Image.fromarray(phantoms[0]), "JPEG", quality=95),
        "png8": _encode(Image.fromarray(phantoms[1]).convert("RGB"), "PNG"),
        "png16": _encode(Image.fromarray(phantoms[2].astype(np.uint16) * 257), "PNG"),
        "dicom": dcm.read_bytes(),
    }


def _post(client: TestClient, path: str, data: bytes, name: str = "x.png", **kwargs: object):
    return client.post(path, files={"file": (name, data, "application/octet-stream")}, **kwargs)


def _assert_healthy(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize("kind", ["jpeg", "png8", "png16", "dicom"])
def test_predict_good_formats(client: TestClient, good_files: dict[str, bytes], kind: str) -> None:
    # The client's name and declared type are ignored: a DICOM called .png is still read as DICOM.
    r = _post(client, "/v1/predict", good_files[kind], name="scan.png")
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["threshold"] == pytest.approx(0.4) and body["model"] == "resnet18"
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= 0.4 else "NORMAL")
    assert body["version"] and body["latency_ms"] >= 0 and body["backend"] == "torch"
    assert r.headers["cache-control"] == "no-store"


def test_predict_matches_the_predictor(client: TestClient, ckpt: Path, good_files: dict[str, bytes]) -> None:
    from pneumoscope.serve.predict import Predictor

    expected = Predictor(ckpt).predict_bytes(good_files["jpeg"]).prob_pneumonia
    assert _post(client, "/v1/predict", good_files["jpeg"]).json()["probability"] == pytest.approx(
        expected, abs=1e-6)


def _corrupt_jpeg() -> bytes:
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(300)


def _truncated_png() -> bytes:
    data = _encode(Image.fromarray(make_phantom(np.random.default_rng(1), 64)), "PNG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(("data", "status", "message"), [
    pytest.param(b"x" * (MAX_UPLOAD + 1), 413, "too large", id="too-large"),
    # A decompression bomb: the header claims 60000x60000, the file is 80 bytes.
    pytest.param(png_with_header(60_000, 60_000), 422, "too large|above the limit", id="pixel-bomb"),
    pytest.param(png_with_header(2000, 1001), 422, "above the limit", id="over-max-pixels"),
    pytest.param(b"this is a text file, renamed to .png\n", 415, "unsupported file type", id="text"),
    pytest.param(b"<html><body>hi</body></html>", 415, "unsupported file type", id="html"),
    pytest.param(_corrupt_jpeg(), 422, "upload: ", id="corrupt-jpeg"),
    pytest.param(_truncated_png(), 422, "upload: ", id="truncated-png"),
    pytest.param(b"", 422, "empty", id="empty"),
])
def test_bad_uploads_get_json_errors(client: TestClient, data: bytes, status: int, message: str) -> None:
    for path in ("/v1/predict", "/v1/explain", "/v1/preview"):
        r = _post(client, path, data, name="chest.png")
        assert r.status_code == status, (path, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert re.search(message, r.json()["error"]), r.json()
        assert "chest.png" not in r.json()["error"]  # the client's file name is never echoed
    _assert_healthy(client)


def test_size_limit_is_enforced_while_reading(client: TestClient, good_files: dict[str, bytes]) -> None:
    def body():  # a streamed body without Content-Length: the limit cannot rely on the header
        yield (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(50):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    r = client.post("/v1/predict", content=body(),
                    headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    # A Content-Length that lies (claims small, sends more) changes nothing either.
    big = b"x" * (MAX_UPLOAD + 10)
    files = {"file": ("a.png", big, "image/png")}
    request = client.build_request("POST", "/v1/predict", files=files)
    request.headers["Content-Length"] = "100"
    r = client.send(request)
    assert r.status_code == 413, r.text
    _assert_healthy(client)


@pytest.mark.parametrize(("kwargs", "status", "message"), [
    ({"files": {"image": ("a.png", b"\x89PNG", "image/png")}}, 422, "no file"),
    ({"files": {"method": (None, "gradcam")}}, 422, "no file"),  # multipart without a file
    ({"data": {"file": "x"}}, 400, "multipart"),  # a urlencoded form
    ({"content": b"\x89PNG\r\n\x1a\n", "headers": {"Content-Type": "image/png"}}, 400, "multipart"),
    ({}, 400, "multipart"),
    ({"content": b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
      "headers": {"Content-Type": "multipart/form-data; boundary=b"}}, 400, "multipart"),
])
def test_missing_or_malformed_form(client: TestClient, kwargs: dict, status: int, message: str) -> None:
    r = client.post("/v1/predict", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    _assert_healthy(client)


def test_two_files_and_unknown_routes(client: TestClient, good_files: dict[str, bytes]) -> None:
    files = [("file", ("a.png", good_files["png8"], "image/png")),
             ("file", ("b.png", good_files["png8"], "image/png"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 400 and "one image per request" in r.json()["error"]
    assert client.get("/v1/predict").status_code == 405
    assert client.get("/v1/predict").json()["error"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]
    assert client.get("/static/../app.py").status_code == 404


def test_model_card(client: TestClient) -> None:
    r = client.get("/v1/model")
    assert r.status_code == 200
    card = r.json()
    assert card["name"] == "resnet18" and card["classes"] == ["NORMAL", "PNEUMONIA"]
    assert card["threshold"] == pytest.approx(0.4) and card["threshold_method"] == "default-0.5"
    assert set(card["metrics"]) == {"validation", "test"}
    assert card["preprocessing"]["image_size"] == 48
    assert "Not a medical device" in card["limitations"][0] and card["intended_use"]
    assert card["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": 2_000_000,
                              "max_aspect_ratio": 20.0, "max_uploads": 16, "body_timeout_s": 30.0,
                              "batch_max": 16, "batch_wait_ms": 5.0,
                              "accepted_types": ["JPEG", "PNG", "DICOM"]}
    assert "gradcam" in card["explain_methods"] and len(card["sha256"]) == 64


def test_model_card_with_metrics_and_nan(tmp_path: Path) -> None:
    import torch

    from pneumoscope.models.checkpoint import CheckpointInfo, save_checkpoint
    from pneumoscope.models.factory import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=32).eval()
    metrics = {"val": {"auc": 0.9, "sensitivity": float("nan")}, "test": {"auc": 0.8}}
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.3,
                          threshold_method="youden", metrics=metrics)
    path = save_checkpoint(tmp_path / "m.safetensors", model, info)
    with TestClient(create_app(path)) as c:
        card = c.get("/v1/model").json()
    assert card["metrics"] == {"validation": {"auc": 0.9, "sensitivity": None}, "test": {"auc": 0.8}}
    assert card["threshold_method"] == "youden"


def test_explain_returns_a_png(client: TestClient, good_files: dict[str, bytes]) -> None:
    r = _post(client, "/v1/explain", good_files["png8"])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    img.load()
    assert img.mode == "RGB" and img.width >= 96
    prob = float(r.headers["x-probability"])
    assert r.headers["x-method"] == "gradcam" and r.headers["x-label"] in ("NORMAL", "PNEUMONIA")
    predicted = _post(client, "/v1/predict", good_files["png8"]).json()["probability"]
    assert prob == pytest.approx(predicted, abs=1e-5)
    # Without the title strip the overlay has the preview's size (the page stacks the two).
    plain = Image.open(io.BytesIO(_post(client, "/v1/explain?title=false&method=hirescam",
                                        good_files["png8"]).content))
    preview = _post(client, "/v1/preview", good_files["png8"])
    assert preview.headers["content-type"] == "image/png"
    assert plain.size == Image.open(io.BytesIO(preview.content)).size
    assert plain.height < img.height
    r = client.post("/v1/explain", files={"file": ("a", good_files["png8"])}, data={"method": "scorecam"})
    assert r.status_code == 422 and "gradcam" in r.json()["error"]
    r = client.post("/v1/explain?title=maybe", files={"file": ("a", good_files["png8"])})
    assert r.status_code == 422 and "true or false" in r.json()["error"]


def test_page_and_static_files(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Research use only" in r.text and "not a medical device" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text  # offline: no CDN
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "https://" not in r.text
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/v1/predict", "/v1/explain",
                                                                   "/v1/model", "/healthz"}


def test_concurrent_requests_are_consistent(client: TestClient, good_files: dict[str, bytes]) -> None:
    kinds = ["jpeg", "png8", "png16", "dicom"]
    expected = {k: _post(client, "/v1/predict", good_files[k]).json()["probability"] for k in kinds}
    assert np.ptp(list(expected.values())) > 1e-4  # distinct answers, so a mix-up would show
    results: list[tuple[str, float | int]] = []
    lock = threading.Lock()

    def work(offset: int) -> None:
        for i in range(6):
            kind = kinds[(offset + i) % len(kinds)]
            r = _post(client, "/v1/predict", good_files[kind])
            with lock:
                results.append((kind, r.json()["probability"] if r.status_code == 200 else r.status_code))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 36
    for kind, prob in results:
        assert prob == pytest.approx(expected[kind], abs=1e-6), kind


def test_onnx_backend_and_onnx_file(ckpt: Path, good_files: dict[str, bytes], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    with TestClient(create_app(ckpt, backend="onnx")) as c:
        body = _post(c, "/v1/predict", good_files["png8"]).json()
        assert body["backend"] == "onnx"
        torch_prob = _post(c, "/v1/explain", good_files["png8"]).headers["x-probability"]
        assert body["probability"] == pytest.approx(float(torch_prob), abs=1e-4)
    from pneumoscope.export.onnx import export_onnx

    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx", check=False)
    with TestClient(create_app(onnx_path, backend="onnx")) as c:
        assert _post(c, "/v1/predict", good_files["png8"]).json()["probability"] == pytest.approx(
            body["probability"], abs=1e-5)
        r = _post(c, "/v1/explain", good_files["png8"])
        assert r.status_code == 501 and ".safetensors" in r.json()["error"]
        assert c.get("/v1/model").json()["explain_methods"] == []


def test_create_app_checks_arguments(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_upload_bytes"):
        create_app(ckpt, max_upload_bytes=0)
    with pytest.raises(FileNotFoundError):
        create_app(tmp_path / "missing.safetensors")


def test_cli_serve_prints_the_url(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from pneumoscope.cli import main

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", str(ckpt), "--port", "8123", "--max-upload-mb", "1.5"]) == 0
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8123
    assert seen["app"].state.service.max_upload_bytes == int(1.5 * 2**20)
    assert main(["serve", str(ckpt), "--max-upload-mb", "0"]) == 2
