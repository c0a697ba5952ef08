"""Pictures people would rather look at than read: curves, confusion, mistakes, filters, feature maps, and the
trust pictures (the reliability diagram before and after temperature scaling, the behavioural tests)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ..files import atomic_path  # noqa: E402

# The seed lesson's hand-made kernels: edges along x and y, and a high-pass (Laplacian).
SEED_KERNELS = {
    "Sobel x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "Sobel y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "high-pass": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
}


def save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _show(ax, img: np.ndarray, title: str = "", cmap: str | None = None, fontsize: float = 8) -> None:
    """img is (C, H, W) in any range; grey images get a grey map."""
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap=cmap or "gray")
    else:
        img = img.transpose(1, 2, 0)
        lo, hi = img.min(), img.max()
        ax.imshow((img - lo) / (hi - lo + 1e-8))
    ax.set_title(title, fontsize=fontsize)
    ax.axis("off")


def learning_curves(history: list[dict[str, Any]]) -> plt.Figure:
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", label="train")
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    best = min(history, key=lambda r: r["val_loss"])
    axes[0].axvline(best["epoch"], color="grey", ls="--", lw=1)
    axes[2].plot(epochs, [r["lr"] for r in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    axes[2].set_xlabel("epoch")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _short(text: str, limit: int = 18, keep_end: bool = False) -> str:
    """At most `limit` characters; ids keep their end (the index or the file name), names their start."""
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1):] if keep_end else text[: limit - 1] + "…"


def sample_label(sample_id: str) -> str:
    """A sample id short enough for a picture's title: `#index` for the MNIST family's `<file>.gz:<index>`, the
    path's end for an image folder's."""
    return "#" + sample_id.rsplit(":", 1)[1] if ".gz:" in sample_id else _short(sample_id, 16, keep_end=True)


def confusion_matrix(cm: np.ndarray, classes: list[str]) -> plt.Figure:
    k = len(classes)
    names = [_short(c) for c in classes]
    size = max(4.0, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(np.log1p(cm), cmap="Blues")
    if k > 10:
        ax.set_xticks(range(k), names, rotation=90)
    elif max(map(len, names)) > 3:  # long names side by side would run into each other
        ax.set_xticks(range(k), names, rotation=45, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        hi = np.log1p(cm).max()
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if np.log1p(cm[i, j]) > hi / 2 else "black")
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.2%})")
    fig.tight_layout()
    return fig


def misclassified(images: np.ndarray, labels: np.ndarray, pred: np.ndarray, probs: np.ndarray,
                  classes: list[str], limit: int, ids: list[str] | None = None) -> plt.Figure:
    """The most confident mistakes first: those say most about the model. Each is titled with its
    sample id (the file and index, or the image's path), the `sample` column of predictions.csv."""
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:limit]
    n = max(len(wrong), 1)
    # Few, large cells: MLflow's preview shrinks the picture to its panel, and the titles must stay legible there.
    cols = min(6, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong):
        sample = sample_label(ids[i]) if ids is not None else f"#{i}"
        _show(ax, images[i], f"{sample}\ntrue {_short(classes[labels[i]], 10)}\n"
                             f"pred {_short(classes[pred[i]], 10)} {probs[i, pred[i]]:.0%}", fontsize=13)
    if not len(wrong):
        axes[0, 0].set_title("no misclassified test images")
    fig.suptitle(f"most confident mistakes ({len(np.flatnonzero(pred != labels))} misclassified test images in all; "
                 "# is the index in the test file)", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # the title above the first row's titles
    return fig


def flips(images: np.ndarray, labels: np.ndarray, challenger: np.ndarray, production: np.ndarray,
          classes: list[str], ids: list[str], production_name: str, limit: int = 24) -> plt.Figure:
    """The test images two models disagree on being right about: those the challenger breaks (production right;
    in red: what a user sees as a regression after the upgrade), then those it fixes (green), half of `limit`
    each where both have that many, each with its id, its label and both answers."""
    right_c, right_p = challenger == labels, production == labels
    broken, fixed = np.flatnonzero(right_p & ~right_c), np.flatnonzero(right_c & ~right_p)
    some_broken = min(len(broken), max(limit - len(fixed), limit // 2))  # half each, unless one kind is short
    shown = [(i, "broken") for i in broken[:some_broken]] + [(i, "fixed") for i in fixed[: limit - some_broken]]
    cols = min(6, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, kind) in zip(axes.flat, shown):
        sample = sample_label(ids[i])
        _show(ax, images[i], f"{sample} {kind}\ntrue {_short(classes[labels[i]], 10)}\n"
                             f"{production_name} {_short(classes[production[i]], 8)}, new {_short(classes[challenger[i]], 8)}",
              fontsize=11)
        ax.title.set_color("#b00020" if kind == "broken" else "#1b6e20")
    if not shown:
        axes[0, 0].set_title("no flips: both models are right and wrong on the same images", fontsize=11)
    fig.suptitle(f"against production {production_name}: {len(broken)} test images broken (red), {len(fixed)} fixed "
                 f"(green); {len(shown)} shown, all in flips.csv", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return fig


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def conv_filters(model: nn.Module) -> plt.Figure | None:
    conv = first_conv(model)
    if conv is None:
        return None
    w = conv.weight.detach().float().cpu().numpy()
    n = len(w)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        _show(ax, w[i][:1] if w.shape[1] not in (1, 3) else w[i], f"{i}", cmap="RdBu_r")
    fig.suptitle(f"first conv layer: {n} learned {w.shape[2]}x{w.shape[3]} filters", fontsize=10)
    fig.tight_layout()
    return fig


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor, per_block: int = 8) -> plt.Figure | None:
    """Activations of one image after each conv block (each max-pool)."""
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    if not pools:
        return None
    captured: list[torch.Tensor] = []
    hooks = [p.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float().cpu())) for p in pools]
    try:
        model.eval()(image[None].to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    rows = len(captured) + 1
    fig, axes = plt.subplots(rows, per_block, figsize=(1.2 * per_block, 1.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _show(axes[0, 0], image.cpu().numpy(), "input")
    for r, fmap in enumerate(captured, start=1):
        for c in range(min(per_block, fmap.shape[1])):
            _show(axes[r, c], fmap[0, c][None].numpy(), f"block {r} ch {c}", cmap="viridis")
    fig.suptitle("feature maps of one test image through each conv block", fontsize=10)
    fig.tight_layout()
    return fig


def seed_kernels(image: torch.Tensor) -> plt.Figure:
    """The seed's Sobel and high-pass kernels applied to a sample image (first channel)."""
    x = image[:1][None].float()
    fig, axes = plt.subplots(1, len(SEED_KERNELS) + 1, figsize=(2.4 * (len(SEED_KERNELS) + 1), 2.6))
    _show(axes[0], x[0].numpy(), "input")
    for ax, (name, k) in zip(axes[1:], SEED_KERNELS.items()):
        out = F.conv2d(x, torch.tensor(k, dtype=torch.float32)[None, None], padding=1)
        _show(ax, out[0].numpy(), name, cmap="RdBu_r")
    fig.suptitle("hand-made kernels from the lesson", fontsize=10)
    fig.tight_layout()
    return fig


def reliability_diagram(calibration: dict[str, Any]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    bins = calibration["bins"]
    edges = np.linspace(0, 1, bins + 1)
    t = calibration["temperature"]
    for ax, key, ece, title in ((axes[0], "diagram_before", calibration["ece_before"], "raw softmax"),
                                (axes[1], "diagram", calibration["ece"], f"temperature {t:.3f} (as served)")):
        d = calibration[key]
        count = np.array(d["count"])
        acc = np.where(count > 0, d["accuracy"], np.nan)
        ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
        gap = np.where(count > 0, np.array(d["confidence"]) - np.nan_to_num(acc), 0)
        ax.bar(edges[:-1], gap, bottom=np.nan_to_num(acc), width=1 / bins, align="edge", color="tab:red",
               alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)",
               title=f"{title}\nECE {ece:.4f}")
        share = ax.twinx()
        share.step(edges[:-1], count / max(count.sum(), 1), where="post", color="grey", lw=1)
        share.set(ylim=(0, 1), yticks=[])
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Reliability on the test split (grey: share of images per bin)")
    fig.tight_layout()
    return fig


def behaviour(rows: list[dict[str, Any]], classes: list[str]) -> plt.Figure:
    names = [r["test"] for r in rows]
    fig, (bars, heat) = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 3),
                                     gridspec_kw={"width_ratios": [1, 1.6]})
    y = np.arange(len(rows))
    colours = ["tab:grey" if r["max_drop"] is None and r["test"] != "clean" else
               ("tab:green" if r["passed"] else "tab:red") for r in rows]
    bars.barh(y, [r["accuracy"] for r in rows], color=colours)
    base = rows[0]["accuracy"]
    for i, r in enumerate(rows):
        bars.text(min(r["accuracy"], 0.98), i, f" {r['accuracy']:.2%}", va="center", ha="right", fontsize=9,
                  color="white")
        if r["max_drop"] is not None:
            bars.plot([base - r["max_drop"]] * 2, [i - 0.4, i + 0.4], "k-", lw=2)
    bars.set(yticks=y, yticklabels=names, xlim=(0, 1), xlabel="accuracy (black bar: the lowest allowed)",
             title="Behavioural tests (green pass, red fail, grey not gated)")
    bars.invert_yaxis()
    grid = np.array([r["per_class"] for r in rows])
    im = heat.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    heat.set(yticks=y, yticklabels=names, xticks=range(len(classes)),
             title="Accuracy per class under each test")
    heat.set_xticklabels([_short(c, 10) for c in classes], rotation=60 if len(classes) > 10 else 0, fontsize=8)
    if len(classes) <= 20:
        for (i, j), v in np.ndenumerate(grid):
            heat.text(j, i, f"{v * 100:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=heat, fraction=0.03)
    fig.tight_layout()
    return fig
