"""Dynamic batching: the Batcher alone, and the service answering concurrent uploads in batches."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import numpy as np
import pytest

from pneumoscope.serve.batching import Batcher


async def _prepared(item: str, delay: float) -> str:
    await asyncio.sleep(delay)
    if item.startswith("undecodable"):
        raise ValueError(f"{item}: cannot decode")
    return item


def _batcher(seen: list[list[str]], max_size: int = 4, wait_s: float = 0.05) -> Batcher[str, str]:
    def run_batch(items: Sequence[str]) -> list[str]:
        seen.append(list(items))
        if "breaks-the-model" in items:
            raise RuntimeError("model call failed")
        return [f"result:{i}" for i in items]

    return Batcher(run_batch, max_size=max_size, wait_s=wait_s, run_in_thread=anyio.to_thread.run_sync)


def test_concurrent_items_share_bounded_batches_and_get_their_own_results() -> None:
    seen: list[list[str]] = []
    batcher = _batcher(seen)

    async def main() -> list[str]:
        return await asyncio.gather(*(batcher.run(lambda i=i: _prepared(f"x{i}", 0.001 * (i % 3)))
                                      for i in range(10)))

    assert asyncio.run(main()) == [f"result:x{i}" for i in range(10)]
    assert sorted(i for batch in seen for i in batch) == sorted(f"x{i}" for i in range(10))
    assert max(map(len, seen)) == 4 and len(seen) < 10  # batched, never above max_size


def test_a_lone_request_does_not_wait() -> None:
    batcher = _batcher([], wait_s=1.0)

    async def main() -> float:
        start = time.perf_counter()
        assert await batcher.run(lambda: _prepared("alone", 0)) == "result:alone"
        return time.perf_counter() - start

    assert asyncio.run(main()) < 0.5


def test_an_idle_batcher_runs_a_request_solo_and_queues_the_next_behind_it() -> None:
    seen: list[list[str]] = []
    batcher = _batcher(seen, wait_s=0.05)
    order: list[str] = []

    async def solo() -> str:
        await asyncio.sleep(0.05)  # the others arrive meanwhile and must wait for a batch
        order.append("solo")
        return "result:solo"

    async def main() -> list[str]:
        first = asyncio.ensure_future(batcher.run(lambda: _prepared("unused", 0), solo=solo))
        await asyncio.sleep(0.01)
        rest = [batcher.run(lambda n=n: _prepared(n, 0), solo=solo) for n in ("b", "c")]
        return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == ["result:solo", "result:b", "result:c"]
    assert batcher.solo == 1 and order == ["solo"] and seen == [["b", "c"]]


def test_errors_stay_with_their_own_request() -> None:
    seen: list[list[str]] = []
    batcher = _batcher(seen)

    async def main() -> list[object]:
        names = ["a", "undecodable-b", "breaks-the-model", "d", "e"]
        return await asyncio.gather(*(batcher.run(lambda n=n: _prepared(n, 0)) for n in names),
                                    return_exceptions=True)

    a, b, c, d, e = asyncio.run(main())
    assert (a, d, e) == ("result:a", "result:d", "result:e")
    assert isinstance(b, ValueError) and "undecodable-b" in str(b)
    assert isinstance(c, RuntimeError) and "model call failed" in str(c)
    assert ["breaks-the-model"] in seen  # retried alone after its batch failed


def test_batcher_checks_its_settings() -> None:
    with pytest.raises(ValueError, match="at least 1, got 0"):
        _batcher([], max_size=0)
    with pytest.raises(ValueError, match="5000 ms"):
        _batcher([], wait_s=5.0)


pytest.importorskip("fastapi", reason="the web service needs the serve extra")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from test_app import _corrupt_jpeg, _encode, _post  # noqa: E402
from test_predict import make_checkpoint, write_dicom  # noqa: E402

from pneumoscope.data.synthetic import make_phantom  # noqa: E402
from pneumoscope.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("batch-ckpt") / "model.safetensors")


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    phantoms = [make_phantom(rng, 96, pneumonia=i % 2 == 1) for i in range(4)]
    dcm = write_dicom(tmp_path_factory.mktemp("batch-dcm") / "x.dcm", phantoms[3].astype(np.uint16) * 16)
    big = Image.fromarray(phantoms[0]).resize((700, 600), Image.Resampling.BICUBIC)
    return {"jpeg": _encode(big, "JPEG", quality=95),  # decoded at a reduced scale
            "png8": _encode(Image.fromarray(phantoms[1]).convert("RGB"), "PNG"),
            "png16": _encode(Image.fromarray(phantoms[2].astype(np.uint16) * 257), "PNG"),
            "dicom": dcm.read_bytes()}


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_service_batches_concurrent_uploads_with_the_sequential_answers(
        ckpt: Path, uploads: dict[str, bytes], backend: str) -> None:
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    kinds = ["jpeg", "png8", "png16", "dicom"]
    with TestClient(create_app(ckpt, backend=backend, batch_max=1)) as c:
        expected = {k: _post(c, "/v1/predict", uploads[k]).json() for k in kinds}
    assert np.ptp([e["probability"] for e in expected.values()]) > 1e-4
    results: list[tuple[str, int, dict]] = []
    lock = threading.Lock()
    app = create_app(ckpt, backend=backend, batch_max=8, batch_wait_ms=50)
    with TestClient(app) as c:
        def work(offset: int) -> None:
            for i in range(4):
                kind = [*kinds, "corrupt"][(offset + i) % 5]
                data = _corrupt_jpeg() if kind == "corrupt" else uploads[kind]
                r = _post(c, "/v1/predict", data)
                with lock:
                    results.append((kind, r.status_code, r.json()))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert c.get("/v1/model").json()["limits"]["batch_max"] == 8
    assert len(results) == 32
    for kind, status, body in results:
        if kind == "corrupt":  # a bad upload fails alone; the batch it would have joined goes on
            assert status == 422 and body["error"].startswith("upload: ")
            continue
        assert status == 200, body
        assert body["probability"] == pytest.approx(expected[kind]["probability"], abs=1e-5), kind
        assert (body["label"], body["gate"]) == (expected[kind]["label"], expected[kind]["gate"])
    batcher = app.state.service.batcher
    assert batcher.items + batcher.solo >= sum(kind != "corrupt" for kind, _, _ in results)
    assert batcher.batches < batcher.items  # some uploads did share a model call


def test_cli_serve_passes_the_batch_settings(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from pneumoscope.cli import main

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert main(["serve", str(ckpt), "--batch-max", "1", "--batch-wait-ms", "2"]) == 0
    batcher = seen["app"].state.service.batcher  # type: ignore[attr-defined]
    assert (batcher.max_size, batcher.wait_s) == (1, 0.002)
    assert main(["serve", str(ckpt), "--batch-max", "0"]) == 2


def test_cli_serve_batches_by_default_with_torch_only(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's per-image cost does not fall with the batch (speed2-cpu.md): no batching."""
    pytest.importorskip("onnxruntime")
    import uvicorn

    from pneumoscope.cli import main
    from pneumoscope.serve.batching import DEFAULT_BATCH_MAX

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    assert main(["serve", str(ckpt)]) == 0
    assert seen["app"].state.service.batcher.max_size == DEFAULT_BATCH_MAX  # type: ignore[attr-defined]
    assert main(["serve", str(ckpt), "--backend", "onnx"]) == 0
    assert seen["app"].state.service.batcher.max_size == 1  # type: ignore[attr-defined]
