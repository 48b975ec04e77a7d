"""benchmarks/speed2.py: the bounds it derives for missed targets, on hand-made profiles."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import speed2  # noqa: E402


def _predict(p50: float, p95: float, decode: float, model: float) -> dict[str, dict[str, float]]:
    return {"2048px-phantom": {"p50_ms": p50, "p95_ms": p95, "decode_p50_ms": decode,
                               "model_gate_p50_ms": model},
            "2048px-film": {"p50_ms": p50, "p95_ms": p95, "decode_p50_ms": 2 * decode,
                            "model_gate_p50_ms": model + 3}}  # the same model work, timed noisier


def test_gaps_from_hand_profiles() -> None:
    s = {
        "predict": {"torch/full": _predict(40, 60, 16, 15), "torch/draft": _predict(20, 35, 4, 16),
                    "onnx/full": _predict(24, 28, 16, 6), "onnx/draft": _predict(10, 12, 4, 6)},  # met
        "folder": {"model_call_ms_per_image_batch32": {"torch": 10.0, "onnx": 5.0},
                   "runs": {f"torch/{speed2.OLD}": {"images_per_s": 40.0},
                            f"torch/{speed2.NEW}": {"images_per_s": 60.0},
                            "torch/draft only, no decode workers": {"images_per_s": 50.0},
                            f"onnx/{speed2.OLD}": {"images_per_s": 50.0},
                            f"onnx/{speed2.NEW}": {"images_per_s": 80.0}}},
        "serve": {"model_call_ms_per_image": {"torch": {"1": 20.0, "4": 10.0, "16": 8.0},
                                              "onnx": {"1": 9.0, "16": 9.0}},
                  "runs": {"torch/batching-off": {"http floor": {"throughput_rps": 300.0}},
                           "onnx/batching-off": {}}},
    }
    text = "\n".join(speed2.gaps(s, cores_used=2))
    assert "needs p95 ≤ 30.0 ms" in text  # half of the full path's 60 ms
    assert "decode 4.0 + model and gate 16.0 (lowest p50 of the inputs) = 20.0 ms" in text
    assert "80% of it" in text
    assert "p95 sits 1.75x above the median" in text
    assert "2048-px predict (onnx)" not in text
    assert "at most 100.0 images/s even if decoding were free (2.50x today's)" in text  # 1000 / 10 ms
    # draft decode: 1000 / 50 - 10 = 10 core-ms; torch: 2000 / (2 * 10 + 10), onnx: 2000 / (2 * 5 + 10)
    assert "the draft decode's 10.0 core-ms an image the cores allow at most 66.7 images/s (1.67x" in text
    assert "reaches 60.0 (90% of that)" in text
    assert "at most 100.0 images/s (2.00x today's), and the new path reaches 80.0 (80% of that)" in text
    assert "into 8.0 ms (2.50x" in text and "allow 125 req/s" in text and "about 64 req/s" in text
    assert "answers 300.0 req/s" in text
    assert "into 9.0 ms (1.00x" in text  # onnx: batching saves nothing
    assert speed2.gaps({}) == []
