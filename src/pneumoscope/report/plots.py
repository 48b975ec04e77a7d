"""The report's figures: pure functions from numbers to PNG bytes (matplotlib, Agg backend).

Every function takes plain data (labels, probabilities, thresholds, counts) and a colour per
model, draws on its own figure and closes it, so figures never leak between calls and the
same model has the same colour on every plot.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are built on servers and in CI
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ImportError as exc:  # an optional extra: say how to get it
    raise ModuleNotFoundError(
        f"reports need matplotlib ({exc}): `pip install 'pneumoscope[report]'`") from exc

from sklearn.metrics import auc as area_under
from sklearn.metrics import precision_recall_curve, roc_curve

from pneumoscope.evaluation.metrics import expected_calibration_error, reliability_curve

DPI = 100
# Colour-blind-safe (Okabe-Ito) first, then matplotlib's tab10 for long model lists.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")


@dataclass(frozen=True)
class Scores:
    """One model's predictions on a split, and the threshold chosen for it on validation."""

    labels: np.ndarray
    probs: np.ndarray
    threshold: float
    auc: float | None = None
    """The AUC to print in the legend (the leaderboard's, computed from unrounded scores)."""
    predicted: np.ndarray | None = None
    """The saved calls (0/1), made before the probabilities were rounded for the CSV."""


def model_colors(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per model, in the given order (the same on every plot)."""
    extra = [matplotlib.colors.to_hex(c) for c in matplotlib.colormaps["tab10"].colors]
    palette = list(PALETTE) + extra
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _rates(s: Scores, threshold: float) -> tuple[float, float, float]:
    """(false positive rate, sensitivity, precision) at ``threshold``."""
    pred = s.probs >= threshold
    pos, neg = s.labels == 1, s.labels == 0
    tpr = float(pred[pos].mean()) if pos.any() else float("nan")
    fpr = float(pred[neg].mean()) if neg.any() else float("nan")
    precision = float(s.labels[pred].mean()) if pred.any() else 1.0
    return fpr, tpr, precision


def _point_legend(ax: plt.Axes) -> None:
    ax.plot([], [], "o", color="gray", markeredgecolor="black", label="val-chosen threshold")
    ax.plot([], [], "s", color="none", markeredgecolor="gray", markeredgewidth=1.5, label="threshold 0.5")


def roc_plot(scores: Mapping[str, Scores], colors: Mapping[str, str]) -> bytes:
    """ROC curves of all models on one plot, each with its operating points marked."""
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1)
    for name, s in scores.items():
        c = colors[name]
        if len(np.unique(s.labels)) == 2:
            fpr, tpr, _ = roc_curve(s.labels, s.probs)
            auc = s.auc if s.auc is not None else float(area_under(fpr, tpr))
            ax.plot(fpr, tpr, color=c, lw=2, label=f"{name} (AUC {auc:.3f})")
        x, y, _ = _rates(s, s.threshold)
        ax.plot(x, y, "o", color=c, markeredgecolor="black", ms=8, zorder=3)
        x, y, _ = _rates(s, 0.5)
        ax.plot(x, y, "s", color="none", markeredgecolor=c, markeredgewidth=1.8, ms=8, zorder=3)
    _point_legend(ax)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC curve (test)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pr_plot(scores: Mapping[str, Scores], colors: Mapping[str, str]) -> bytes:
    """Precision-recall curves of all models on one plot, prevalence as the chance line."""
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    prevalence = None
    for name, s in scores.items():
        c = colors[name]
        prevalence = float(np.mean(s.labels)) if len(s.labels) else None
        if len(np.unique(s.labels)) == 2:
            precision, recall, _ = precision_recall_curve(s.labels, s.probs)
            ax.plot(recall, precision, color=c, lw=2, label=name, drawstyle="steps-post")
        _, x, y = _rates(s, s.threshold)
        ax.plot(x, y, "o", color=c, markeredgecolor="black", ms=8, zorder=3)
        _, x, y = _rates(s, 0.5)
        ax.plot(x, y, "s", color="none", markeredgecolor=c, markeredgewidth=1.8, ms=8, zorder=3)
    if prevalence is not None:
        ax.axhline(prevalence, ls=":", color="0.6", lw=1, label=f"prevalence {prevalence:.2f}")
    _point_legend(ax)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.01, 1.01),
           ylim=(0.0, 1.02), title="Precision-recall curve (test)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def confusion_plot(confusion: Mapping[str, int], title: str, color: str = "#0072B2",
                   class_names: Sequence[str] = ("NORMAL", "PNEUMONIA")) -> bytes:
    """A 2x2 confusion matrix (rows: truth, columns: prediction) with counts and row shares."""
    m = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], dtype=float)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    cmap = matplotlib.colors.LinearSegmentedColormap.from_list("one", ["#ffffff", color])
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    ax.imshow(share, cmap=cmap, vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{int(m[i, j])}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=11,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks([0, 1], class_names, fontsize=8)
    ax.set_yticks([0, 1], class_names, fontsize=8, rotation=90, va="center")
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def reliability_plot(scores: Mapping[str, Scores], colors: Mapping[str, str], n_bins: int = 10) -> bytes:
    """Reliability diagram of all models (mean predicted vs observed frequency per bin), ECE in
    the legend, and below it how the predictions spread over the bins."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 5.6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls=":", color="0.6", lw=1, label="perfect calibration")
    edges = np.linspace(0, 1, n_bins + 1)
    width = (1.0 / n_bins) / max(1, len(scores))
    for i, (name, s) in enumerate(scores.items()):
        c = colors[name]
        mean_pred, frac_pos, counts = reliability_curve(s.labels, s.probs, n_bins=n_bins)
        ece = expected_calibration_error(s.labels, s.probs, n_bins=n_bins)
        ax.plot(mean_pred, frac_pos, "o-", color=c, lw=1.8, ms=5, label=f"{name} (ECE {ece:.3f})")
        hist.bar(edges[:-1] + i * width, counts, width=width, align="edge", color=c, alpha=0.8)
    ax.set(ylabel="observed pneumonia fraction", xlim=(0, 1), ylim=(-0.02, 1.02),
           title=f"Reliability (test, {n_bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="predicted probability of pneumonia", ylabel="images")
    hist.set_yscale("symlog", linthresh=10)
    hist.grid(alpha=0.3)
    return _png(fig)


def training_curves_plot(histories: Mapping[str, Mapping[str, Sequence[float | None]]],
                         colors: Mapping[str, str]) -> bytes:
    """Loss (train dashed, validation solid) and validation AUC per epoch, one colour per model.

    ``histories``: model → ``{"epoch": [...], "train_loss": [...], "val_loss": [...],
    "val_auc": [...]}`` (missing values as ``None``).
    """
    fig, (loss_ax, auc_ax) = plt.subplots(1, 2, figsize=(9.6, 3.6))

    def series(h: Mapping[str, Sequence[float | None]], key: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(e, v) for e, v in zip(h.get("epoch", []), h.get(key, []), strict=False) if v is not None]
        if not pairs:
            return np.array([]), np.array([])
        e, v = zip(*pairs, strict=True)
        return np.asarray(e, dtype=float) + 1, np.asarray(v, dtype=float)  # epochs from 1

    for name, h in histories.items():
        c = colors[name]
        for key, ls, label in (("train_loss", "--", "train"), ("val_loss", "-", "val")):
            x, y = series(h, key)
            if len(x):
                loss_ax.plot(x, y, ls=ls, marker="o", ms=4, color=c, label=f"{name} {label}")
        x, y = series(h, "val_auc")
        if len(x):
            auc_ax.plot(x, y, marker="o", ms=4, color=c, label=name)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss (train dashed, validation solid)")
    auc_ax.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    for ax in (loss_ax, auc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    return _png(fig)
