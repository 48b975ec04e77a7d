"""Train several registry models on the same split and seed, then rank them honestly."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pneumoscope.config import RunConfig
from pneumoscope.data.datasets import load_splits
from pneumoscope.evaluation.compare import build_leaderboard, write_leaderboard
from pneumoscope.models.registry import get_spec
from pneumoscope.training.tracking import compare_config, track_run
from pneumoscope.training.train import train, with_overrides

log = logging.getLogger(__name__)


def parse_weights(text: str, models: Sequence[str]) -> dict[str, str]:
    """``"hub"`` → that source for every model; ``"efficientnet_lite0=package,resnet18=none"``
    → per model (models not named use ``hub``). A bare value and pairs can be mixed:
    ``"none,efficientnet_lite0=package"``."""
    default, per_model = "hub", {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            name, source = (s.strip() for s in part.split("=", 1))
            if name not in models:
                raise ValueError(f"--weights names {name!r}, which is not in --models "
                                 f"({', '.join(models)})")
            per_model[name] = source
        else:
            default = part
    return {m: per_model.get(m, default) for m in models}


def compare(
    config: RunConfig, models: Sequence[str], weights: Mapping[str, str] | None = None, *,
    resume: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate each model in ``models`` (same data, split and seed) under
    ``config.out/compare-name``, then write ``leaderboard.{csv,md,json}`` there."""
    for name in models:
        get_spec(name)  # unknown names fail before any training starts
    if len(set(models)) != len(models):
        raise ValueError(f"--models lists a model twice: {', '.join(models)}")
    out = Path(config.out) / (config.name or "compare")
    splits = load_splits(config.data, config.train.seed)  # decoded once, shared by all models
    sources = {name: (weights or {}).get(name, config.model.weights) for name in models}
    run_dirs = []
    # One MLflow "compare" run holds the leaderboard; the model runs nest under it.
    with track_run(compare_config(config, list(models), sources), out, kind="compare",
                   resume=resume) as parent:
        for i, name in enumerate(models, 1):
            log.info("[%d/%d] training %s", i, len(models), name)
            source = sources[name]
            run_config = replace(with_overrides(config, model={"name": name, "weights": source}),
                                 out=str(out), name=name)
            done = (run_config.run_dir / "model.safetensors").is_file() and \
                (run_config.run_dir / "metrics.json").is_file()
            if done and resume:
                log.info("%s already finished; skipping (resume)", name)
            else:
                last = run_config.run_dir / "checkpoints" / "last.ckpt"
                train(run_config, resume=resume and last.is_file(), splits=splits, progress=progress,
                      tracking_parent=parent)
            run_dirs.append(run_config.run_dir)
        board = build_leaderboard(run_dirs, n_resamples=config.eval.n_bootstrap or 1000,
                                  seed=config.eval.bootstrap_seed)
        paths = write_leaderboard(board, out)
        report = write_report(out)
        parent.log_artifacts(*paths.values(), *report.values())
    log.info("leaderboard: %s", paths["md"])
    return {"out_dir": out, "leaderboard": board, "paths": paths, "report": report}


def write_report(out: Path) -> dict[str, Path]:
    """``report.{html,md}`` in the compare folder. Optional: the models are trained and the
    leaderboard written already, so a missing extra or a failing report only logs a warning."""
    try:
        from pneumoscope.report import build_report

        return build_report(out)
    except ImportError as exc:
        log.warning("no report.html (%s); install 'pneumoscope[report]' and run `pneumoscope report %s`",
                    exc, out)
    except Exception as exc:
        log.warning("report.html failed (%s: %s); rebuild it with `pneumoscope report %s`",
                    type(exc).__name__, exc, out, exc_info=True)
    return {}
