"""Choose the Kermany fine-tune recipe and threshold rule on validation only (never on test).

    python benchmarks/recipe_search.py --data ../shared/data/chest_xray

(From scratch: four 160 px trainings, whose times are in the result's "train s" column,
plus a few minutes of stress scoring; finished run folders under --runs are reused, so a rerun
only re-scores.)

Why: the patient-grouped validation split comes from the same acquisition as the training
images and is saturated (AUC ~0.998, specificity ~0.99 for every recipe), so it cannot rank
recipes; yet the first recipe lost specificity on the official test films (0.77). This search
asks instead how well each recipe's validation scores and frozen operating point survive
acquisition changes: the same validation images after fixed stress tests
(``pneumoscope.evaluation.stress``: gamma, contrast, blur, noise, JPEG, low resolution,
histogram equalisation, sharpening).

Protocol (the test split is never loaded here):
- Candidates: EfficientNet-Lite0, 160 px, 4 epochs (the first recipe's budget), seed 0 (its
  validation split), one run each, the test split removed from the data before training.
  Round 1: light augmentation (the first recipe), strong augmentation, label smoothing 0.1.
  Round 2, added after round 1's *validation* stress results: texture augmentation.
- Recipe criterion: balanced accuracy at the run's own validation-chosen (Youden) threshold,
  averaged over the stress families that no candidate's augmentation trains for (computed
  from the presets, see COVERS). The highest wins, unless the first recipe is within 0.005.
- Threshold rule, for the chosen recipe: Youden on clean validation vs Youden on clean plus
  stressed validation (``eval.threshold_on=val+stress``), compared leave-one-family-out
  (choose on the other families, score balanced accuracy on the held-out one). The stressed
  rule is adopted only if it wins.
Writes ``benchmarks/results/recipe-search-kermany.{json,md}``; ``accuracy.py`` then runs the
chosen recipe with 3 seeds and reads the test split once per seed, at the end.

Round 3 (issue #16, ``--round 3``; written down in this file before any of its runs and
before any new test evaluation):

    python benchmarks/recipe_search.py --data ../shared/data/chest_xray --round 3

- Base: the round-2 winner (texture augmentation, 160 px, 4 epochs), validation split of
  ``data.split_seed=0``, the test split removed before training. Retrained on this code.
- Candidates (:data:`ROUND3`, listed simplest first): the single model; with test-time
  augmentation (``pneumoscope.evaluation.tta.TTA_VIEWS``, threshold re-chosen on the TTA
  validation probabilities); a deep ensemble of 3 (``train.seed`` 0, 1, 2 on the one split,
  built by ``pneumoscope.models.ensemble.build_ensemble``: averaged logits, threshold and gate
  re-fitted on the shared validation split), with and without TTA.
- Criterion: the round-2 criterion (balanced accuracy at the candidate's own validation-chosen
  threshold, mean over the stress families that no candidate trains for). Budget: a candidate
  whose recipe (all members' training) takes over 60 minutes on these 2 cores is not eligible.
  The simplest eligible candidate within MARGIN (0.005) of the best wins.
- Threshold rule for the winner: clean vs clean+stressed Youden, leave one family out, as in
  round 2. The k-fold out-of-fold threshold (``pneumoscope threshold-oof``) is not searched:
  it costs k more trainings per seed (5 x 10 minutes here), beyond this budget.
- Not searched, for cost on these 2 cores (decided before any round-3 result existed, when
  the first run showed training at ~2.5x its quiet-machine time while the machine was shared):
  EfficientNet-Lite1/Lite2 (offline weights installed; ~1.5x Lite0's cost at 160 px, ~2.3x /
  ~3x at their native 240 / 260 px) and larger input sizes. On a GPU they are minutes each.
Writes ``benchmarks/results/recipe-search-kermany-r3.{json,md}``; ``accuracy.py`` runs the
winner as recipe ``kermany-r3`` (3 split seeds; for split seed 0 it reuses these runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import hardware, versions

from pneumoscope.config import RunConfig, load_config
from pneumoscope.data.augment import augment_config
from pneumoscope.data.cache import cached_images
from pneumoscope.data.datasets import load_splits
from pneumoscope.data.records import read_records
from pneumoscope.evaluation.inference import predict_proba
from pneumoscope.evaluation.metrics import binary_metrics
from pneumoscope.evaluation.stress import STRESS_TESTS, stress_probabilities, stress_report
from pneumoscope.evaluation.threshold import choose_threshold
from pneumoscope.evaluation.tta import TTA_VIEWS
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.pipeline import train
from pneumoscope.runs import RunLayout, read_summary

RESULTS = Path(__file__).resolve().parent / "results"
COMMON = ["model.name=efficientnet_lite0", "model.weights=package", "data.batch_size=32",
          "train.lr=0.001", "train.warmup_epochs=0.3", "data.image_size=160", "train.epochs=4"]


@dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]
    round: int
    run: tuple[str, str]
    """(folder under --runs, run name). The search keeps its own runs, so accuracy.py can run
    before or after it."""


CANDIDATES: dict[str, Candidate] = {
    "light": Candidate(("eval.n_bootstrap=1000",), 1, ("recipe-search", "lite0-light-seed0")),
    "strong": Candidate(("data.augment=strong", "eval.n_bootstrap=200"), 1,
                        ("recipe-search", "lite0-strong-seed0")),
    "light-smooth0.1": Candidate(("train.label_smoothing=0.1", "eval.n_bootstrap=200"), 1,
                                 ("recipe-search", "lite0-smooth-seed0")),
    # Round 2, added after round 1's validation stress results: every round-1 model lost
    # specificity under noise, JPEG and sharpening, i.e. it read fine texture as disease.
    "texture": Candidate(("data.augment=texture", "eval.n_bootstrap=200"), 2,
                         ("recipe-search", "lite0-texture-seed0")),
}


@dataclass(frozen=True)
class Round3Candidate:
    """A recipe of round 3: a model trained with :data:`ROUND3_BASE` by each of ``seeds``
    (one seed: a single model; several: a deep ensemble of them), scored with or without TTA."""

    model: str
    seeds: tuple[int, ...]
    tta: bool


ROUND3_BASE = ("data.augment=texture", "eval.n_bootstrap=200")
ROUND3: dict[str, Round3Candidate] = {
    "texture": Round3Candidate("efficientnet_lite0", (0,), False),
    "texture+tta": Round3Candidate("efficientnet_lite0", (0,), True),
    "texture-ens3": Round3Candidate("efficientnet_lite0", (0, 1, 2), False),
    "texture-ens3+tta": Round3Candidate("efficientnet_lite0", (0, 1, 2), True),
}
ROUND3_SPLIT_SEED = 0
ROUND3_RUNS = "recipe-search-r3"
BUDGET_S = 3600.0
"""The issue's budget for the whole headline recipe (all members) on 2 CPU cores."""


def round3_member_config(model: str, seed: int, split_seed: int, root: str, runs: Path) -> RunConfig:
    """One member run of a round-3 recipe (``accuracy.py`` uses it too, so split seed 0's
    members are trained once)."""
    short = model.replace("efficientnet_", "")
    return load_config(dotted=[*COMMON, *ROUND3_BASE, f"model.name={model}", f"data.root={root}",
                               f"data.split_seed={split_seed}", f"train.seed={seed}",
                               f"out={runs / ROUND3_RUNS}",
                               f"name={short}-texture-split{split_seed}-seed{seed}",
                               "tracking.enabled=false"])


# Stress families an augmentation setting already trains for; those leave the criterion.
COVERS = {"contrast": ("contrast",), "gamma": ("gamma",), "noise": ("noise",),
          "blur": ("blur", "low_resolution")}
MARGIN = 0.005
SEED = 0


def covered_families(overrides: tuple[str, ...]) -> set[str]:
    """Stress families the candidate's training augmentation covers."""
    config = load_config(dotted=list(overrides))
    if config.data.augment == "none":
        return set()
    aug = augment_config(config.data.augment)
    used = {"contrast": aug.contrast > 0 or aug.brightness > 0, "gamma": aug.gamma != (1.0, 1.0),
            "noise": aug.noise > 0, "blur": aug.blur > 0}
    return {family for knob, on in used.items() if on for family in COVERS[knob]}


def criterion_families() -> tuple[str, ...]:
    """Families no candidate trains for: the only fair ground to compare them on."""
    covered = set().union(*(covered_families(c.overrides) for c in CANDIDATES.values()))
    return tuple(f for f in dict.fromkeys(f for f, _ in STRESS_TESTS.values()) if f not in covered)


def candidate_config(name: str, root: str, runs: Path) -> RunConfig:
    folder, run_name = CANDIDATES[name].run
    return load_config(dotted=[*COMMON, *CANDIDATES[name].overrides, f"data.root={root}",
                               f"train.seed={SEED}", f"out={runs / folder}", f"name={run_name}",
                               "tracking.enabled=false"])


def ensure_trained(config: RunConfig) -> None:
    """Train the candidate on train/val only; the test split is dropped before training."""
    if RunLayout(config.run_dir).metrics.is_file():
        return
    splits = load_splits(config.data, config.split_seed)
    splits.pop("test", None)
    train(config, splits=splits, progress=False, resume=(config.run_dir / "checkpoints").is_dir())


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray, threshold: float) -> float:
    return binary_metrics(labels, probs, threshold)["balanced_accuracy"]


def stress_scores(config: RunConfig, model_file: Path | None = None,
                  tta: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Validation labels, probabilities per condition (``clean`` + each stress test), threshold.

    ``model_file``: score this file (an ensemble) instead of the run's model, on the run's
    validation split. ``tta``: with test-time augmentation; the threshold is then re-chosen with
    the file's rule on the TTA validation probabilities (what ``eval.tta`` does in training).
    """
    layout = RunLayout(config.run_dir)
    model, info = load_checkpoint(model_file or layout.model, channels_last=True)
    records = read_records(layout.split_file("val"))
    images = np.asarray(cached_images(records, config.data.image_size).images)
    labels = np.array([r.label for r in records])
    views = TTA_VIEWS if tta else None
    probs = {"clean": predict_proba(model, images, tta=views),
             **stress_probabilities(model, images, tta=views)}
    threshold = float(info.threshold)
    if tta:
        threshold = choose_threshold(labels, probs["clean"], config.eval.threshold_method,
                                     config.eval.target_sensitivity)
    return labels, probs, threshold


def summarise(labels: np.ndarray, probs: dict[str, np.ndarray], threshold: float,
              families: tuple[str, ...]) -> dict[str, Any]:
    per_test = stress_report(labels, probs, threshold)
    unseen = [n for n, (family, _) in STRESS_TESTS.items() if family in families]
    def mean(metric: str, names: list[str]) -> float:
        return float(np.mean([per_test[n][metric] for n in names]))
    return {"threshold": threshold, "per_test": per_test,
            "criterion": mean("balanced_accuracy", unseen),
            "specificity": mean("specificity", unseen), "sensitivity": mean("sensitivity", unseen),
            "log_loss": mean("log_loss", unseen),
            "balanced_accuracy_all_stress": mean("balanced_accuracy", list(STRESS_TESTS))}


def threshold_rules(labels: np.ndarray, probs: dict[str, np.ndarray]) -> dict[str, Any]:
    """Leave-one-family-out comparison of two validation-only threshold rules."""
    families = sorted({family for family, _ in STRESS_TESTS.values()})
    clean_t = choose_threshold(labels, probs["clean"])
    rows = {}
    for held in families:
        held_tests = [n for n, (f, _) in STRESS_TESTS.items() if f == held]
        others = [n for n, (f, _) in STRESS_TESTS.items() if f != held]
        pooled_t = choose_threshold(np.concatenate([labels] * (len(others) + 1)),
                                    np.concatenate([probs["clean"], *(probs[n] for n in others)]))
        rows[held] = {
            "clean_youden": {"threshold": clean_t, "balanced_accuracy": float(np.mean(
                [balanced_accuracy(labels, probs[n], clean_t) for n in held_tests]))},
            "stressed_youden": {"threshold": pooled_t, "balanced_accuracy": float(np.mean(
                [balanced_accuracy(labels, probs[n], pooled_t) for n in held_tests]))},
        }
    mean = {rule: float(np.mean([r[rule]["balanced_accuracy"] for r in rows.values()]))
            for rule in ("clean_youden", "stressed_youden")}
    return {"held_out": rows, "mean_balanced_accuracy": mean,
            "chosen": "stressed_youden" if mean["stressed_youden"] > mean["clean_youden"]
            else "clean_youden"}


def choose(results: dict[str, dict[str, Any]]) -> str:
    """Highest criterion; within MARGIN of the first (simplest) candidate, the first stays."""
    def crit(n: str) -> float:
        return results[n]["stress"]["criterion"]
    best = max(results, key=crit)
    first = next(iter(results))
    return first if crit(first) >= crit(best) - MARGIN else best


def write_result(stem: Path, result: dict[str, Any], to_markdown: Callable[[dict[str, Any]], str]) -> Path:
    """``stem``.json and .md, with hardware, versions, the command and the time added; the .md path."""
    result = {**result, "hardware": hardware(), "versions": versions(),
              "command": shlex.join([sys.executable, *sys.argv]),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = stem.with_suffix(".md")
    md.write_text(to_markdown(result))
    return md


def markdown(result: dict[str, Any]) -> str:
    families = ", ".join(result["criterion_families"])
    lines = ["# Recipe search on validation only (Kermany, EfficientNet-Lite0, seed 0)", "",
             f"Command: `{result['command']}`  ", f"Hardware: {result['hardware']['cpu']}  ",
             "The test split is never loaded. Criterion: balanced accuracy at each run's "
             f"validation-chosen threshold, mean over the stress families no candidate trains for "
             f"({families}). Stress tests: `pneumoscope.evaluation.stress`.", "",
             "| candidate | round | overrides | clean val AUC | clean val bal. acc | criterion | "
             "spec / sens (criterion families) | log loss (criterion families) | "
             "bal. acc, all stress tests | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["candidates"].items():
        s, clean = r["stress"], r["stress"]["per_test"]["clean"]
        mark = " **(chosen)**" if name == result["chosen_recipe"] else ""
        lines.append(
            f"| {name}{mark} | {r['round']} | `{' '.join(r['overrides'])}` | {clean['auc']:.4f} | "
            f"{clean['balanced_accuracy']:.3f} | {s['criterion']:.3f} | "
            f"{s['specificity']:.3f} / {s['sensitivity']:.3f} | {s['log_loss']:.3f} | "
            f"{s['balanced_accuracy_all_stress']:.3f} | {r['wall_time_s']:.0f} |")
    lines += ["", "Per stress test: balanced accuracy (specificity / sensitivity) at the run's "
              "threshold:", "", "| candidate | threshold | " + " | ".join(
                  ["clean", *STRESS_TESTS]) + " |", "|---|---|" + "---|" * (len(STRESS_TESTS) + 1)]
    for name, r in result["candidates"].items():
        cells = [f"{v['balanced_accuracy']:.3f} ({v['specificity']:.2f}/{v['sensitivity']:.2f})"
                 for v in r["stress"]["per_test"].values()]
        lines.append(f"| {name} | {r['stress']['threshold']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "Threshold rule, leave one stress family out (balanced accuracy on the "
              "held-out family; clean-validation Youden vs clean+stressed Youden):", "",
              "| candidate | " + " | ".join(result["families"]) + " | mean | better rule |",
              "|---|" + "---|" * (len(result["families"]) + 2)]
    for name, r in result["candidates"].items():
        rules = r["threshold_rules"]
        cells = [f"{v['clean_youden']['balanced_accuracy']:.3f} / "
                 f"{v['stressed_youden']['balanced_accuracy']:.3f}"
                 for v in rules["held_out"].values()]
        mean = rules["mean_balanced_accuracy"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean['clean_youden']:.3f} / "
                     f"{mean['stressed_youden']:.3f} | {rules['chosen']} |")
    lines += ["", f"**Chosen recipe: {result['chosen_recipe']}**, threshold rule "
              f"**{result['chosen_threshold_rule']}**: `{' '.join(result['chosen_overrides'])}`.", ""]
    return "\n".join(lines)


def round3_runs(name: str, root: str, runs: Path) -> list[RunConfig]:
    c = ROUND3[name]
    return [round3_member_config(c.model, seed, ROUND3_SPLIT_SEED, root, runs) for seed in c.seeds]


def round3_model_file(configs: list[RunConfig], tta: bool = False) -> Path | None:
    """``None`` for a single model (its run's file); else the ensemble file, built once
    (``tta``: its threshold chosen on TTA validation probabilities, the views recorded)."""
    if len(configs) == 1:
        return None
    from pneumoscope.models.ensemble import build_ensemble

    seeds = "".join(str(c.train.seed) for c in configs)
    name = f"{configs[0].model.name}-ens-split{configs[0].split_seed}-seeds{seeds}{'-tta' * tta}"
    out = Path(configs[0].out) / f"{name}.safetensors"
    if not out.is_file():
        build_ensemble([c.run_dir for c in configs], out, tta=tta)
    return out


def choose_round3(results: dict[str, dict[str, Any]]) -> str:
    """The simplest (first listed) eligible candidate within MARGIN of the best eligible one."""
    eligible = [n for n, r in results.items() if r["eligible"]]
    if not eligible:
        raise SystemExit(f"no candidate trains within the {BUDGET_S:.0f} s budget")
    best = max(results[n]["stress"]["criterion"] for n in eligible)
    return next(n for n in eligible if results[n]["stress"]["criterion"] >= best - MARGIN)


def main_round3(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    members = {c.run_dir: c for name in ROUND3 for c in round3_runs(name, args.data, runs)}
    for i, config in enumerate(members.values(), 1):
        logging.info("round 3: training %d/%d: %s", i, len(members), config.run_dir)
        ensure_trained(config)
    if args.train_only:
        return
    families = criterion_families()
    results: dict[str, dict[str, Any]] = {}
    for name, candidate in ROUND3.items():
        configs = round3_runs(name, args.data, runs)
        model_file = round3_model_file(configs)
        labels, probs, threshold = stress_scores(configs[0], model_file, candidate.tta)
        train_s = sum(read_summary(c.run_dir).wall_time_s for c in configs)
        results[name] = {"model": candidate.model, "seeds": list(candidate.seeds), "tta": candidate.tta,
                         "runs": [str(c.run_dir) for c in configs],
                         "model_file": str(model_file or RunLayout(configs[0].run_dir).model),
                         "train_s": train_s, "eligible": train_s <= BUDGET_S,
                         "stress": summarise(labels, probs, threshold, families),
                         "threshold_rules": threshold_rules(labels, probs)}
        logging.info("%s: criterion %.3f (train %.0f s)", name, results[name]["stress"]["criterion"], train_s)
    chosen = choose_round3(results)
    result = {"dataset": f"Kermany chest_xray (validation split of split seed {ROUND3_SPLIT_SEED}; "
                         "test not loaded)",
              "base_overrides": [*COMMON, *ROUND3_BASE], "candidates": results,
              "criterion_families": list(families),
              "families": sorted({f for f, _ in STRESS_TESTS.values()}), "margin": MARGIN,
              "budget_s": BUDGET_S, "chosen_recipe": chosen,
              "chosen_threshold_rule": results[chosen]["threshold_rules"]["chosen"]}
    md = write_result(Path(args.out) / "recipe-search-kermany-r3", result, markdown_round3)
    logging.info("round 3 chosen: %s; wrote %s", chosen, md)


def markdown_round3(result: dict[str, Any]) -> str:
    families = ", ".join(result["criterion_families"])
    lines = ["# Recipe search, round 3 (issue #16): zoo, deep ensembles, TTA — validation only", "",
             f"Command: `{result['command']}`  ", f"Hardware: {result['hardware']['cpu']}  ",
             f"Base: `{' '.join(result['base_overrides'])}`; {result['dataset']}. Criterion: balanced "
             f"accuracy at each candidate's validation-chosen threshold, mean over the stress families no "
             f"candidate trains for ({families}); eligible if all its trainings take <= "
             f"{result['budget_s']:.0f} s on these cores; the simplest eligible candidate within "
             f"{result['margin']} of the best wins.", "",
             "| candidate | model | members (train seeds) | TTA | clean val AUC | clean val bal. acc | "
             "threshold | criterion | spec / sens (criterion families) | bal. acc, all stress tests | "
             "train s | eligible |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["candidates"].items():
        s, clean = r["stress"], r["stress"]["per_test"]["clean"]
        mark = " **(chosen)**" if name == result["chosen_recipe"] else ""
        lines.append(
            f"| {name}{mark} | {r['model']} | {', '.join(map(str, r['seeds']))} | "
            f"{'yes' if r['tta'] else 'no'} | {clean['auc']:.4f} | {clean['balanced_accuracy']:.3f} | "
            f"{s['threshold']:.3f} | {s['criterion']:.3f} | "
            f"{s['specificity']:.3f} / {s['sensitivity']:.3f} | {s['balanced_accuracy_all_stress']:.3f} | "
            f"{r['train_s']:.0f} | {'yes' if r['eligible'] else 'no'} |")
    lines += ["", "Per stress test: balanced accuracy (specificity / sensitivity) at the candidate's "
              "threshold:", "", "| candidate | " + " | ".join(["clean", *STRESS_TESTS]) + " |",
              "|---|" + "---|" * (len(STRESS_TESTS) + 1)]
    for name, r in result["candidates"].items():
        cells = [f"{v['balanced_accuracy']:.3f} ({v['specificity']:.2f}/{v['sensitivity']:.2f})"
                 for v in r["stress"]["per_test"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rules = result["candidates"][result["chosen_recipe"]]["threshold_rules"]["mean_balanced_accuracy"]
    lines += ["", f"**Chosen: {result['chosen_recipe']}**; threshold rule "
              f"**{result['chosen_threshold_rule']}** (leave one stress family out, mean balanced "
              f"accuracy clean Youden {rules['clean_youden']:.3f} vs clean+stressed Youden "
              f"{rules['stressed_youden']:.3f}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Kermany folder (e.g. ../shared/data/chest_xray)")
    parser.add_argument("--runs", default="runs", help="parent of the run folders")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--round", type=int, choices=(2, 3), default=2,
                        help="2: the round 1-2 search (recipe-search-kermany); 3: issue #16's")
    parser.add_argument("--train-only", action="store_true",
                        help="round 3: train the candidates' runs (resumable), score nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.round == 3:
        main_round3(args)
        return
    families = criterion_families()
    results: dict[str, dict[str, Any]] = {}
    for name, candidate in CANDIDATES.items():
        config = candidate_config(name, args.data, Path(args.runs))
        ensure_trained(config)
        labels, probs, threshold = stress_scores(config)
        summary = read_summary(config.run_dir)
        results[name] = {"round": candidate.round, "overrides": list(candidate.overrides),
                         "run_dir": str(config.run_dir), "wall_time_s": summary.wall_time_s,
                         "augmentation_covers": sorted(covered_families(candidate.overrides)),
                         "stress": summarise(labels, probs, threshold, families),
                         "threshold_rules": threshold_rules(labels, probs)}
        logging.info("%s: criterion %.3f", name, results[name]["stress"]["criterion"])
    chosen = choose(results)
    rule = results[chosen]["threshold_rules"]["chosen"]
    overrides = [*COMMON, *CANDIDATES[chosen].overrides]
    if rule == "stressed_youden":
        overrides.append("eval.threshold_on=val+stress")
    result = {"dataset": "Kermany chest_xray (validation split of seed 0; test not loaded)",
              "candidates": results, "criterion_families": list(families),
              "families": sorted({f for f, _ in STRESS_TESTS.values()}), "margin": MARGIN,
              "chosen_recipe": chosen, "chosen_threshold_rule": rule,
              "chosen_overrides": overrides}
    md = write_result(Path(args.out) / "recipe-search-kermany", result, markdown)
    logging.info("chosen: %s with %s; wrote %s", chosen, rule, md)


if __name__ == "__main__":
    main()
