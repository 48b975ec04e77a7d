"""Deploying at a new site, measured: the official Kermany test split plays the new hospital.

    python benchmarks/site.py --checkpoint runs/.../model.safetensors --data ../shared/data/chest_xray
    python benchmarks/site.py --quick          # minutes: synthetic site, random model, checks the code

The test split is cut, by patient, into a calibration half and an evaluation half, ``--repeats``
times (different random cuts). For each size n in ``--sizes`` a stratified draw of n films from
the calibration half stands in for the films a site can label; every choice (temperature,
threshold, BatchNorm statistics) is made on those n films only and scored on the disjoint
evaluation half:

  (a) frozen            the checkpoint as shipped (its validation threshold and temperature)
  (b) calibrate-youden  temperature + Youden threshold fitted on the n films
  (c) calibrate-sens95  temperature + the highest threshold with sensitivity >= 0.95 on them
  (d) adapt             AdaBN on the n films (labels unused), threshold kept
  (e) adapt+sens95      AdaBN, then (c) on the adapted model's logits of the same n films

Images are decoded once into one uint8 array; the frozen logits are computed once; each
adaptation costs one forward of its n films (twice: AdaBN, then the logits for (e)) and one of
the evaluation half. Also reported: a risk-coverage table of the frozen model on the whole test
split, and abstain bands chosen on each calibration half and scored on its evaluation half.
Writes ``benchmarks/results/<tag>.{json,md}`` (``--quick``: ``runs/site-quick/``) and, on the
real test split, a row in the test-split ledger beside them (``benchmarks/ledger.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions
from ledger import recipe_sha256, record_file

from pneumoscope.data.cache import cached_images
from pneumoscope.data.records import ImageRecord, attach_manifest, load_folder
from pneumoscope.data.splits import grouped_split, subsample
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.evaluation.selective import (
    band_metrics,
    choose_abstain_band,
    risk_at_coverage,
    risk_coverage,
)
from pneumoscope.jsonio import json_safe
from pneumoscope.models.checkpoint import CheckpointInfo, load_checkpoint
from pneumoscope.models.factory import XrayClassifier
from pneumoscope.site.adapt import adapt_batchnorm, batchnorm_layers
from pneumoscope.site.calibrate import fit_calibration
from pneumoscope.site.common import predict_logits, probabilities

log = logging.getLogger("site")

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_OUT = Path(__file__).resolve().parents[1] / "runs" / "site-quick"
METHODS = ("frozen", "calibrate-youden", "calibrate-sens95", "adapt", "adapt+sens95")
SCORES = ("accuracy", "sensitivity", "specificity", "ece", "log_loss")
TARGET = {"n": 100, "accuracy": 0.93, "sensitivity": 0.95}
BAND_TARGETS = (0.95, 0.97)
LABEL_NOTE = ("Test labels are used here only because every choice (temperature, threshold, "
              "BatchNorm statistics, abstain band) is made on the calibration half and scored on "
              "the disjoint, patient-grouped evaluation half. These numbers describe deployment "
              "at a new site; they never feed back into the headline recipe, which is chosen on "
              "validation only.")


def _score(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    m = binary_metrics(labels, probs, threshold)
    return {k: m[k] for k in SCORES}


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "p5": float("nan"), "p95": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)), "n": int(v.size)}


def _draw(rng: np.random.Generator, idx: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """n films from ``idx``, stratified: the calibration half's prevalence, both classes."""
    pos, neg = idx[labels[idx] == 1], idx[labels[idx] == 0]
    n_pos = int(np.clip(round(n * len(pos) / len(idx)), 1, n - 1))
    n_pos, n_neg = min(n_pos, len(pos)), min(n - n_pos, len(neg))
    return np.sort(np.r_[rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])


def load_site(data: Path, size: int, max_films: int | None,
              seed: int) -> tuple[list[ImageRecord], np.ndarray]:
    """The test split (or a flat tree) with manifest patient ids, decoded once into memory."""
    found = load_folder(data)
    split = "test" if "test" in found else "all"
    records = found[split]
    manifest = data / "manifest.csv"
    if manifest.is_file():
        records = [replace(r, patient_id=r.get("patient_id") or r.patient_id)
                   for r in attach_manifest(records, manifest)]
    if max_films and len(records) > max_films:
        records = subsample(records, max_films / len(records), seed)  # patient-grouped
    decoded = cached_images(records, size, desc=f"decoding {split}")
    return decoded.records, np.ascontiguousarray(decoded.images)


def synthetic_site(tmp: Path) -> tuple[Path, Path]:
    """A synthetic test split and a random-init resnet18 checkpoint (code check only)."""
    import torch

    from pneumoscope.data.synthetic import write_kermany_tree
    from pneumoscope.models.checkpoint import save_checkpoint
    from pneumoscope.models.factory import build_model

    data = write_kermany_tree(tmp / "chest_xray", {"test": (60, 90)}, size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("resnet18", "none", image_size=64).eval()
    torch.nn.init.normal_(model.backbone.get_classifier().weight, std=0.3)
    info = CheckpointInfo(model="resnet18", preprocessing=model.preprocessing, threshold=0.5,
                          threshold_method="default-0.5")
    return data, save_checkpoint(tmp / "random.safetensors", model, info)


def run(model: XrayClassifier, info: CheckpointInfo, records: list[ImageRecord], images: np.ndarray,
        *, repeats: int, sizes: list[int], seed: int, batch_size: int,
        adapt_repeats: int | None = None) -> dict[str, Any]:
    labels = np.array([r.label for r in records])
    index = {r.path: i for i, r in enumerate(records)}
    can_adapt = bool(batchnorm_layers(model))
    adapt_repeats = repeats if adapt_repeats is None else min(adapt_repeats, repeats)
    adapt_seconds: list[float] = []
    t0 = time.perf_counter()
    z0 = predict_logits(model, images, batch_size=batch_size)  # raw logits, computed once
    p0 = probabilities(z0, info.temperature)
    log.info("frozen logits of %d films in %.1f s", len(images), time.perf_counter() - t0)

    raw: dict[str, dict[str, dict[str, list[float]]]] = {
        str(n): {m: {k: [] for k in (*SCORES, "threshold", "temperature")} for m in METHODS}
        for n in sizes}
    bands: dict[str, dict[str, list[float]]] = {str(t): {} for t in BAND_TARGETS}
    half_sizes = []
    for rep in range(repeats):
        cal_recs, eval_recs = grouped_split(records, 0.5, seed + rep)
        cal = np.array(sorted(index[r.path] for r in cal_recs))
        ev = np.array(sorted(index[r.path] for r in eval_recs))
        half_sizes.append((len(cal), len(ev)))
        y_ev = labels[ev]
        frozen = _score(y_ev, p0[ev], info.threshold)
        for target in BAND_TARGETS:  # abstain band on the whole calibration half, frozen model
            low, high = choose_abstain_band(labels[cal], p0[cal], info.threshold, target_accuracy=target)
            for k, v in band_metrics(y_ev, p0[ev], low, high).items():
                bands[str(target)].setdefault(k, []).append(v)
        for n in sizes:
            if n >= len(cal):
                continue
            rng = np.random.default_rng([seed, rep, n])
            draw = _draw(rng, cal, labels, n)
            out = raw[str(n)]

            def record(method: str, scores: dict[str, float], threshold: float, t: float,
                       out: dict = out) -> None:
                for k, v in scores.items():
                    out[method][k].append(v)
                out[method]["threshold"].append(threshold)
                out[method]["temperature"].append(t)

            record("frozen", frozen, info.threshold, info.temperature)
            for method, kwargs in (("calibrate-youden", {"method": "youden"}),
                                   ("calibrate-sens95", {"target_sensitivity": 0.95})):
                c = fit_calibration(z0[draw], labels[draw], temperature=True, **kwargs)
                record(method, _score(y_ev, probabilities(z0[ev], c.temperature), c.threshold),
                       c.threshold, c.temperature)
            if not can_adapt or rep >= adapt_repeats:
                continue
            start = time.perf_counter()
            # adapt_batchnorm resets the running statistics first: no state leaks between draws.
            adapt_batchnorm(model, images[draw], batch_size=batch_size)
            z_ev = predict_logits(model, images[ev], batch_size=batch_size)
            record("adapt", _score(y_ev, probabilities(z_ev, info.temperature), info.threshold),
                   info.threshold, info.temperature)
            z_cal = predict_logits(model, images[draw], batch_size=batch_size)
            c = fit_calibration(z_cal, labels[draw], target_sensitivity=0.95, temperature=True)
            record("adapt+sens95", _score(y_ev, probabilities(z_ev, c.temperature), c.threshold),
                   c.threshold, c.temperature)
            adapt_seconds.append(time.perf_counter() - start)
        log.info("repeat %d/%d done (%.0f s so far)", rep + 1, repeats, time.perf_counter() - t0)

    summary = {n: {m: {k: _summary(v) for k, v in per.items()} for m, per in by_m.items() if per["accuracy"]}
               for n, by_m in raw.items()}
    rc = risk_coverage(labels, p0, info.threshold)
    return {
        "n_films": len(labels), "n_pneumonia": int(labels.sum()), "n_normal": int((labels == 0).sum()),
        "n_patients": len({r.patient_id for r in records}),
        "half_sizes": {"calibration_mean": float(np.mean([a for a, _ in half_sizes])),
                       "evaluation_mean": float(np.mean([b for _, b in half_sizes]))},
        "adapt_available": can_adapt, "adapt_repeats": adapt_repeats if can_adapt else 0,
        "seconds_per_adaptation": float(np.mean(adapt_seconds)) if adapt_seconds else None,
        "summary": summary, "per_repeat": raw,
        "frozen_test": _score(labels, p0, info.threshold),
        "risk_coverage": {"aurc": rc["aurc"], "aurc_optimal": rc["aurc_optimal"],
                          "risk_full": rc["risk_full"],
                          "table": risk_at_coverage(labels, p0, info.threshold)},
        "abstain_bands": {t: {k: _summary(v) for k, v in b.items()} for t, b in bands.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    if not s.get("n"):
        return "–"
    return f"{s['mean']:.{digits}f} [{s['p5']:.{digits}f}, {s['p95']:.{digits}f}]"


def markdown(record: dict[str, Any]) -> str:
    hw, res, model = record["hardware"], record["result"], record["model"]
    lines = [
        f"# {record['benchmark']}", "",
        f"Command: `{record['command']}`  ",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores_available']} cores available, "
        f"{hw.get('memory_gib', '?')} GiB, GPU: {hw['gpu'] or 'none'}; load average (1 min) at the "
        f"end: {hw['load_average_1m']}; wall time {res['seconds']} s  ",
        f"Model: {model['source']} — {model['name']} at {model['image_size']} px, threshold "
        f"{model['threshold']:.4g} ({model['threshold_method']}), temperature {model['temperature']:g}  ",
        f"Site: {record['data']} — {res['n_films']} films ({res['n_normal']} NORMAL, "
        f"{res['n_pneumonia']} PNEUMONIA), {res['n_patients']} patients; {record['protocol']['repeats']} "
        f"patient-grouped random halves (calibration ≈ {res['half_sizes']['calibration_mean']:.0f}, "
        f"evaluation ≈ {res['half_sizes']['evaluation_mean']:.0f} films); adapt rows: the first "
        f"{res['adapt_repeats']} repeats, {res['seconds_per_adaptation'] or 0:.1f} s per adaptation", "",
        LABEL_NOTE, "",
        "Values: mean over repeats [5th, 95th percentile] on the evaluation half. n = labelled "
        "calibration films drawn (stratified) from the calibration half; adapt uses them unlabelled.", "",
    ]
    for n, by_method in res["summary"].items():
        lines += [f"## n = {n} calibration films", "",
                  "| method | accuracy | sensitivity | specificity | ECE | threshold | temperature |",
                  "|---|---|---|---|---|---|---|"]
        for method, s in by_method.items():
            lines.append(f"| {method} | {_fmt(s['accuracy'])} | {_fmt(s['sensitivity'])} | "
                         f"{_fmt(s['specificity'])} | {_fmt(s['ece'])} | {_fmt(s['threshold'], 4)} | "
                         f"{_fmt(s['temperature'], 2)} |")
        lines.append("")
    lines += [f"## Target: n = {TARGET['n']}, accuracy ≥ {TARGET['accuracy']} at sensitivity ≥ "
              f"{TARGET['sensitivity']} on the evaluation half", ""]
    for method, verdict in record["target"].items():
        lines.append(f"- {method}: {verdict}")
    rc = res["risk_coverage"]
    lines += ["", "## Risk–coverage, frozen model, whole test split", "",
              f"Confidence: logit distance from the threshold. AURC {rc['aurc']:.4f} (oracle "
              f"{rc['aurc_optimal']:.4f}); error at full coverage {rc['risk_full']:.3f}. In-sample "
              "by construction (no choice is made on these films).", "",
              "| coverage | films accepted | accuracy | sensitivity | specificity | NPV |",
              "|---|---|---|---|---|---|"]
    for row in rc["table"]:
        lines.append(f"| {row['coverage']:.3f} | {row['n_accepted']} | " + " | ".join(
            "–" if row[k] is None else f"{row[k]:.3f}"
            for k in ("accuracy", "sensitivity", "specificity", "npv")) + " |")
    lines += ["", "## Abstain band chosen on the calibration half, scored on the evaluation half", "",
              "Frozen model and threshold; band = the widest coverage whose accepted calibration "
              "films reach the target accuracy (evaluation/selective.py). missed = share of all "
              "pneumonia films called NORMAL.", "",
              "| target accuracy | coverage | accuracy of accepted | sensitivity of accepted | "
              "NPV | missed |", "|---|---|---|---|---|---|"]
    for target, s in res["abstain_bands"].items():
        lines.append(f"| {target} | {_fmt(s['coverage'])} | {_fmt(s['accuracy'])} | "
                     f"{_fmt(s['sensitivity'])} | {_fmt(s['npv'])} | {_fmt(s['missed'])} |")
    v = record["versions"]
    lines += ["", f"Versions: python {v['python']}, torch {v['torch']}, timm {v['timm']}, pneumoscope "
              f"{v['pneumoscope']}, commit {v['git_commit']}.", ""]
    return "\n".join(lines)


def verdicts(summary: dict[str, Any]) -> dict[str, str]:
    at = summary.get(str(TARGET["n"]), {})
    out = {}
    for method in ("calibrate-sens95", "adapt+sens95"):
        if method not in at:
            out[method] = f"not measured (n = {TARGET['n']} not run)"
            continue
        acc, sens = at[method]["accuracy"]["mean"], at[method]["sensitivity"]["mean"]
        met = acc >= TARGET["accuracy"] and sens >= TARGET["sensitivity"]
        out[method] = (f"{'met' if met else 'NOT met'} on average: accuracy {acc:.3f}, "
                       f"sensitivity {sens:.3f} (5th percentile {at[method]['accuracy']['p5']:.3f} "
                       f"and {at[method]['sensitivity']['p5']:.3f})")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model.safetensors (required unless --quick)")
    parser.add_argument("--data", type=Path, help="Kermany root (its test/ split is the site)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sizes", default="25,50,100,200", help="calibration films, comma-separated")
    parser.add_argument("--adapt-repeats", type=int, default=None,
                        help="run (d)/(e) on the first K repeats only (default: all); adaptation "
                             "costs a forward of the evaluation half per repeat and size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-films", type=int, default=None,
                        help="patient-grouped subsample of the site first (quick checks)")
    parser.add_argument("--quick", action="store_true",
                        help="3 repeats, n = 25 and 50, 200 films at most; without --checkpoint a "
                             "synthetic site and a random model (checks the code, not the method)")
    parser.add_argument("--tag", default=None, help="output name (default site-cpu, site-quick)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.sizes = "25,50" if args.sizes == parser.get_default("sizes") else args.sizes
        args.max_films = args.max_films or 200
    if (args.checkpoint is None) != (args.data is None) or (args.checkpoint is None and not args.quick):
        parser.error("--checkpoint and --data go together (without both: --quick, synthetic)")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    tag = args.tag or ("site-quick" if args.quick else "site-cpu")
    out_dir = args.out_dir or (QUICK_OUT if args.quick else RESULTS)

    with tempfile.TemporaryDirectory(prefix="site-bench-") as tmp:
        if args.checkpoint is None:
            data, checkpoint = synthetic_site(Path(tmp))
            source = "random-init resnet18 on a synthetic site (code check: meaningless numbers)"
            data_text = "synthetic phantoms (write_kermany_tree)"
        else:
            data, checkpoint = args.data, args.checkpoint
            source = f"checkpoint {checkpoint}"
            data_text = f"{data} (official test split)"
        # channels_last: oneDNN's faster NHWC kernels on CPU (the training default too).
        model, info = load_checkpoint(checkpoint, channels_last=True)
        config_sha256 = recipe_sha256(info.config) if info.config else ""
        records, images = load_site(data, info.preprocessing.image_size, args.max_films, args.seed)
        with warnings.catch_warnings(record=True) as caught:
            # Expected and visible in the tables (T at a bound, a band refusing every film,
            # small draws): counted here instead of printed hundreds of times.
            warnings.simplefilter("always")
            result = run(model, info, records, images, repeats=args.repeats, sizes=sizes,
                         seed=args.seed, batch_size=args.batch_size,
                         adapt_repeats=args.adapt_repeats)
        counts: dict[str, int] = {}
        for w in caught:
            key = str(w.message).split(":")[0][:80]
            counts[key] = counts.get(key, 0) + 1
        result["warnings"] = counts
        for key, count in counts.items():
            log.info("warning x%d: %s", count, key)

    record = {
        "benchmark": tag, "command": shlex.join([sys.executable, *sys.argv]),
        "model": {"name": info.model, "image_size": info.preprocessing.image_size, "source": source,
                  "threshold": info.threshold, "threshold_method": info.threshold_method,
                  "temperature": info.temperature, "config_sha256": config_sha256},
        "data": data_text,
        "protocol": {"repeats": args.repeats, "adapt_repeats": result["adapt_repeats"],
                     "sizes": sizes, "seed": args.seed,
                     "split": "patient-grouped halves of the test split (StratifiedGroupKFold, "
                              "n_splits=2, seed + repeat)",
                     "draw": "stratified random n films from the calibration half",
                     "methods": list(METHODS), "temperature": "fitted (NLL) in every calibrate step"},
        "note": LABEL_NOTE, "target": verdicts(result["summary"]),
        "hardware": hardware(), "versions": versions(), "result": result,
    }
    record = json_safe(record)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    record_file(out_dir / f"{tag}.json")  # a row in the test-split ledger (none for a synthetic site)
    (out_dir / f"{tag}.md").write_text(markdown(record))
    log.info("wrote %s", out_dir / f"{tag}.md")


if __name__ == "__main__":
    main()
