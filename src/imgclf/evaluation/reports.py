"""The evaluate stage's report folder: tables and pictures written from one Evaluation.

Pictures that do not apply to this model (conv filters of an MLP) are removed, so the
folder never shows an earlier run's figures as if current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..data.batches import Split
from ..files import atomic_path
from . import plots
from .scoring import Evaluation


def write_reports(out: Path, model: nn.Module, test: Split, ev: Evaluation, classes: list[str],
                  history: Optional[list[dict[str, Any]]], max_misclassified: int) -> list[Path]:
    """Write per_class.csv, predictions.csv and the figures into `out`; return the files written."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "per_class.csv", out / "predictions.csv"]
    with atomic_path(written[0]) as tmp:
        ev.per_class().to_csv(tmp, index=False, float_format="%.6f")
    labels = test.labels.numpy()
    with atomic_path(written[1]) as tmp:  # long form, for `dvc plots` confusion matrices
        pd.DataFrame({"sample": test.sample_ids(), "actual": [classes[i] for i in labels],
                      "predicted": [classes[i] for i in ev.predictions]}).to_csv(tmp, index=False)
    sample = test.images[0].float() / 255
    figures = {
        "confusion_matrix.png": plots.confusion_matrix(ev.confusion, classes),
        "misclassified.png": plots.misclassified(test.images.numpy(), labels, ev.predictions, ev.probabilities,
                                                 classes, max_misclassified, test.sample_ids()),
        "seed_kernels.png": plots.seed_kernels(sample),
        "learning_curves.png": plots.learning_curves(history) if history else None,
        "conv_filters.png": plots.conv_filters(model),
        "feature_maps.png": plots.feature_maps(model, sample),
    }
    for name, fig in figures.items():
        if fig is None:
            (out / name).unlink(missing_ok=True)
        else:
            written.append(plots.save(fig, out / name))
    return written


def example_batch(test: Split) -> torch.Tensor:
    """Two float images in [0, 1], the input the exported models are traced with."""
    return (test.images[0].float() / 255)[None].repeat(2, 1, 1, 1)


def run_summary(metrics: dict, train: dict) -> str:
    """The run's description (markdown, on MLflow's Overview page): the numbers people compare, with enough
    digits, where MLflow's one-bar charts would show 1.00 and 0.01."""
    def pct(key: str) -> str:
        return f"{metrics[key]:.2%}" if key in metrics else "–"

    rows = [("test accuracy", pct("accuracy")), ("test macro F1", f"{metrics.get('macro_f1', float('nan')):.4f}"),
            ("test loss", f"{metrics.get('loss', float('nan')):.4f}"),
            ("calibration error (ECE), as served", pct("ece")), ("temperature", f"{metrics.get('temperature', 1):.3f}"),
            ("epochs run", str(train.get("epochs_run", "–"))),
            ("weights kept", f"epoch {train.get('kept_epoch', '–')}: {train.get('kept_because', '')}"),
            ("validation accuracy of those weights", f"{train.get('kept_val_acc', float('nan')):.2%}"),
            ("training time", f"{train.get('train_seconds', float('nan')):.0f} s")]
    rows += [(f"behavioural test {k[len('robust_'):-len('_acc')]}", pct(k)) for k in sorted(metrics)
             if k.startswith("robust_") and k.endswith("_acc")]
    return "| summary | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"

