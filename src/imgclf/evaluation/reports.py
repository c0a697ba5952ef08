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
        pd.DataFrame({"sample": sample_ids(test), "actual": [classes[i] for i in labels],
                      "predicted": [classes[i] for i in ev.predictions]}).to_csv(tmp, index=False)
    sample = test.images[0].float() / 255
    figures = {
        "confusion_matrix.png": plots.confusion_matrix(ev.confusion, classes),
        "misclassified.png": plots.misclassified(test.images.numpy(), labels, ev.predictions, ev.probabilities,
                                                 classes, max_misclassified, sample_ids(test)),
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


def sample_ids(test: Split) -> list[str]:
    """Stable ids: the source file and index (MNIST family) or the image's path (ImageFolder)."""
    return list(test.ids) if test.ids is not None else [str(i) for i in range(len(test))]


def example_batch(test: Split) -> torch.Tensor:
    """Two float images in [0, 1], the input the exported models are traced with."""
    return (test.images[0].float() / 255)[None].repeat(2, 1, 1, 1)
