"""The HTML report of a compare: complete, self-contained (inline PNGs only), and it renders in a
headless browser without console errors. Synthetic data only."""

from __future__ import annotations

import base64
import csv
import functools
import importlib.util
import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("jinja2")
pytest.importorskip("pytorch_grad_cam")

from PIL import Image

from pneumoscope.cli import main
from pneumoscope.data.synthetic import make_phantom
from pneumoscope.report.build import pick_examples
from pneumoscope.report.plots import Scores

QUICK = ["--image-size", "48", "--batch-size", "16", "--set", "train.limit_train_batches=2",
         "--set", "eval.n_bootstrap=50"]
MODELS = ("resnet18", "efficientnet_b0")
SECTIONS = ("summary", "leaderboard", "roc", "pr", "confusion", "thresholds", "reliability", "curves",
            "subtypes", "data", "cams", "faithfulness", "model-cards")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny 48-px models on a shared 2-core machine: two torch threads spin against each other
    and the other processes (measured here: the module took 124 s with two threads, 26 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def compare_dir(kermany_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A tiny 2-model compare; its automatic report is made small (1 example, 4 images)."""
    import pneumoscope.report

    out = tmp_path_factory.mktemp("report") / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PNEUMOSCOPE_CACHE", str(out.parent / "cache"))
        mp.setattr(pneumoscope.report, "build_report", functools.partial(
            pneumoscope.report.build_report, cam_examples=1, faithfulness_images=4))
        assert main(["compare", "--data", str(kermany_tree), "--models", ",".join(MODELS),
                     "--weights", "none", "--epochs", "1", "--out", str(out), "--name", "cmp",
                     *QUICK]) == 0
    yield out / "cmp"


def _images(html: str) -> list[str]:
    return re.findall(r"<img\b[^>]*>", html)


def test_compare_writes_a_complete_self_contained_report(compare_dir: Path) -> None:
    html = (compare_dir / "report.html").read_text()
    for model in MODELS:
        assert html.count(model) >= 10
    for section in SECTIONS:
        assert f'id="{section}"' in html, section
    assert "Model cards" in html and "Intended use" in html and "Not for clinical use" in html
    assert "Grad-CAM++" in html and "ROAD" in html and "test AUC 0.047" in html
    # Robustness table: every model's validation under each stress test (spec / sens cells).
    stress = html[html.index('id="stress"'):html.index('id="reliability"')]
    assert all(m in stress for m in MODELS) and "jpeg_q20" in stress and stress.count(" / ") >= 10
    # The input gate fitted with each model: its validation-set levels and rates per split.
    gate = html[html.index('id="gate"'):html.index('id="reliability"')]
    assert all(m in gate for m in MODELS) and "above refuse" in gate and ">val<" in gate
    images = _images(html)
    # 6 figures + 2 confusion matrices + per model: 4 kinds x 1 example x 3 panels (at most).
    assert len(images) >= 8 + 3 * len(MODELS)
    for tag in images:
        src = re.search(r'src="([^"]*)"', tag)
        assert src and src.group(1).startswith("data:image/png;base64,"), tag[:80]
        png = base64.b64decode(src.group(1).split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(png)) as img:
            img.verify()  # a broken or truncated PNG raises here
            assert img.format == "PNG" and min(img.size) > 10
    # Offline: no external resource of any kind.
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "<script" not in html and "@import" not in html and "url(" not in html

    md = (compare_dir / "report.md").read_text()
    assert "## Leaderboard" in md and "| model | threshold |" in md
    assert all(f"| {m} |" in md for m in MODELS) and "[" in md  # CIs
    assert "Best model by validation AUC" in md and "Grad-CAM faithfulness" in md
    assert "## Robustness to acquisition changes" in md and "| model | threshold | clean |" in md
    assert "| jpeg_q20 |" in md
    assert "## Input gate" in md


def test_compare_logs_the_report_to_mlflow(compare_dir: Path) -> None:
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("MLflow not installed")
    from mlflow.tracking import MlflowClient

    from pneumoscope.tracking import default_store_uri

    client = MlflowClient(tracking_uri=default_store_uri(compare_dir.parent))
    runs = client.search_runs([client.get_experiment_by_name("pneumoscope").experiment_id])
    parent = next(r for r in runs if r.data.tags["kind"] == "compare")
    assert {"report.html", "report.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_report_command_without_cams_and_for_one_run(compare_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(compare_dir), "--out", str(tmp_path / "a"), "--no-cams"]) == 0
    html = (tmp_path / "a" / "report.html").read_text()
    assert "--no-cams" in html and "Grad-CAM++ of" not in html
    assert "report.html" in capsys.readouterr().out
    # A single run folder: the leaderboard has one row and no paired comparison.
    external = tmp_path / "other_site"
    external.mkdir()
    for i in range(3):
        Image.fromarray(make_phantom(np.random.default_rng(i), 80)).save(external / f"x{i}.png")
    assert main(["report", str(compare_dir / "resnet18"), "--out", str(tmp_path / "b"), "--no-cams",
                 "--external", str(external)]) == 0
    html = (tmp_path / "b" / "report.html").read_text()
    assert "resnet18" in html and "efficientnet_b0" not in html
    assert "external: other_site" in html  # the gate's scores on another folder
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_missing_images_skip_their_panel_with_a_note(compare_dir: Path, tmp_path: Path) -> None:
    from pneumoscope.report import build_report

    run = tmp_path / "moved"
    shutil.copytree(compare_dir / "resnet18", run, ignore=shutil.ignore_patterns("checkpoints"))
    with open(run / "predictions_test.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = f"/no/such/folder/{row['file']}"
    with open(run / "predictions_test.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths = build_report(run, cam_examples=1, faithfulness_images=2)
    html = paths["html"].read_text()
    assert "Panel skipped: image not found: /no/such/folder/" in html
    assert "no readable test image" in html


def test_examples_are_the_most_confident_of_each_kind() -> None:
    labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    probs = np.array([0.9, 0.6, 0.2, 0.1, 0.4, 0.95, 0.05, 0.7])
    picked = pick_examples(Scores(labels, probs, 0.5), 1)
    assert picked == {"tp": [0], "tn": [3], "fp": [5], "fn": [6]}
    assert pick_examples(Scores(labels, probs, 0.5), 5)["fp"] == [5, 7]
    # One image per patient: the second film of patient "a" gives way to patient "b".
    assert pick_examples(Scores(labels, probs, 0.5), 2, list("aabcddcf"))["tp"] == [0]
    assert pick_examples(Scores(labels, probs, 0.5), 2, list("abbcddcf"))["tp"] == [0, 1]


def test_report_renders_in_headless_chromium(compare_dir: Path, tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed")
    page_url = (compare_dir / "report.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    if importlib.util.find_spec("playwright") is not None:
        from playwright.sync_api import sync_playwright

        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 4000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url[:80]}"))
            page.goto(page_url)
            broken = page.evaluate("[...document.images].filter(i => !i.complete || !i.naturalWidth).length")
            page.screenshot(path=str(shot))
            browser.close()
        assert errors == [] and broken == 0
    else:
        done = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             f"--screenshot={shot}", "--window-size=1280,4000", page_url],
            capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size[0] == 1280 and img.size[1] >= 1000
        # Not a blank page: the rendered report has many distinct colours (plots, X-rays).
        assert len(img.convert("RGB").resize((320, 320)).getcolors(1 << 16) or []) > 200
