"""Behavioural tests: the test split perturbed (shifts, rotations, noise, inverted contrast, mirroring) and
scored again, overall and per class, against the clean predictions.

Every perturbation is one pass over the split: sample i is shifted in direction i mod 4 (down, up, right,
left) and rotated by +size or -size degrees by parity, so all directions are covered at the cost of one.
Perturbations act on float images in [0, 1], the model's input; uncovered pixels are 0 (black).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import Perturbation
from ..data.batches import Split, to_float


def _shift(x: torch.Tensor, pixels: int, start: int) -> torch.Tensor:
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    h, w = x.shape[-2:]
    p = pixels
    windows = [(0, p), (2 * p, p), (p, 0), (p, 2 * p)]  # content moves down, up, right, left
    out = torch.empty_like(x)
    for d, (top, left) in enumerate(windows):
        idx = torch.arange(len(x))[(torch.arange(len(x)) + start) % 4 == d]
        out[idx] = padded[idx, :, top: top + h, left: left + w]
    return out


def _rotate(x: torch.Tensor, degrees: float, start: int) -> torch.Tensor:
    sign = 1 - 2 * ((torch.arange(len(x)) + start) % 2).to(x.dtype)
    theta = torch.deg2rad(torch.tensor(degrees, dtype=x.dtype)) * sign
    cos, sin = theta.cos(), theta.sin()
    zero = torch.zeros_like(cos)
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def perturb(x: torch.Tensor, p: Perturbation, start: int, noise: torch.Generator) -> torch.Tensor:
    """`x`: float images in [0, 1]; `start`: the index of x[0] in the split (for the per-sample direction)."""
    if p.kind == "shift":
        return _shift(x, int(round(p.size)), start)
    if p.kind == "rotate":
        return _rotate(x, p.size, start)
    if p.kind == "noise":
        return (x + p.size * torch.randn(x.shape, generator=noise).to(x.device)).clamp(0, 1)
    if p.kind == "invert":
        return 1 - x
    if p.kind == "flip":
        return x.flip(-1)
    raise ValueError(f"evaluate.perturbations: unknown kind {p.kind!r}")


@torch.no_grad()
def _predictions(model: nn.Module, split: Split, p: Perturbation, batch_size: int, device: torch.device,
                 seed: int) -> torch.Tensor:
    noise = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(split), batch_size):
        x = to_float(split.images[i: i + batch_size].to(device))
        out.append(model(perturb(x, p, i, noise)).argmax(1).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, k: int) -> list[float]:
    hits = np.bincount(labels, weights=(pred == labels).astype(np.float64), minlength=k)
    return (hits / np.maximum(np.bincount(labels, minlength=k), 1)).tolist()


def robustness(model: nn.Module, split: Split, classes: list[str], clean: np.ndarray,
               tests: list[Perturbation], batch_size: int, device: torch.device = torch.device("cpu"),
               seed: int = 0, progress=None) -> list[dict[str, Any]]:
    """One row per test (the clean split first): accuracy, drop from clean, agreement with the clean
    predictions, per-class accuracy, and whether the drop is within the test's max_drop."""
    model.eval().to(device)
    labels = split.labels.long().numpy()
    k = len(classes)
    base = float((clean == labels).mean()) if len(labels) else 0.0
    rows = [{"test": "clean", "kind": "none", "size": 0.0, "accuracy": base, "drop": 0.0, "agreement": 1.0,
             "max_drop": None, "passed": True, "per_class": per_class_accuracy(clean, labels, k)}]
    for n, p in enumerate(tests):
        pred = _predictions(model, split, p, batch_size, device, seed).numpy()
        acc = float((pred == labels).mean()) if len(labels) else 0.0
        drop = base - acc
        rows.append({"test": p.name, "kind": p.kind, "size": p.size, "accuracy": acc, "drop": drop,
                     "agreement": float((pred == clean).mean()) if len(labels) else 1.0, "max_drop": p.max_drop,
                     "passed": p.max_drop is None or drop <= p.max_drop + 1e-12,
                     "per_class": per_class_accuracy(pred, labels, k)})
        if progress:
            progress("behavioural tests", n + 1, len(tests))
    return rows


def table(rows: list[dict[str, Any]], classes: list[str]):
    """The rows as a DataFrame: one column per class (accuracy) after the summary columns."""
    import pandas as pd

    flat = [{**{k: v for k, v in r.items() if k != "per_class"},
             **{f"acc[{c}]": a for c, a in zip(classes, r["per_class"])}} for r in rows]
    return pd.DataFrame(flat)
