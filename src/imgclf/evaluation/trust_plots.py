"""The trust pictures: the reliability diagram (before and after temperature scaling) and the behavioural
tests (accuracy per perturbation against its limit, and per class)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .plots import _short, plt


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
