"""Test-set evaluation: loss, accuracy, macro F1, per-class table and confusion matrix.

`evaluate` is the one scorer: the evaluate stage scores the challenger with it and the promotion gate
scores production with it, on the same split, so the two numbers the gate compares are comparable. The
per-class scores are a few lines over the confusion matrix rather than torchmetrics', whose import costs every
evaluate and every gate several seconds (calibration.py has the measurement); tests/test_trust.py checks them
against torchmetrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import Split, to_float


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    macro_f1: float
    classes: list[str]
    confusion: np.ndarray  # (K, K): rows true, columns predicted
    predictions: np.ndarray  # (N,)
    probabilities: np.ndarray  # (N, K) float32
    logits: Optional[torch.Tensor] = None  # (N, K), for calibration

    def metric(self, name: str) -> float:
        """One gate metric by its register.metric name."""
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}[name]

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "error_rate": 1.0 - self.accuracy, "n": int(self.confusion.sum())}

    def per_class(self):
        """precision, recall, F1 and support per class, as a pandas DataFrame."""
        import pandas as pd

        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        precision = np.divide(tp, cm.sum(0), out=np.zeros_like(tp), where=cm.sum(0) > 0)
        recall = np.divide(tp, cm.sum(1), out=np.zeros_like(tp), where=cm.sum(1) > 0)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp),
                       where=(precision + recall) > 0)
        return pd.DataFrame({"class": self.classes, "precision": precision, "recall": recall, "f1": f1,
                             "support": cm.sum(1).astype(int)})


@torch.no_grad()
def predict_probabilities(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, probabilities) on the CPU for uint8 images (N, C, H, W)."""
    model.eval().to(device)
    logits = []
    for i in range(0, len(images), batch_size):
        x = to_float(images[i: i + batch_size].to(device))
        logits.append(model(x).float().cpu())
    out = torch.cat(logits) if logits else torch.empty(0, 0)
    return out, out.softmax(1)


def evaluate(model: nn.Module, split: Split, classes: list[str], batch_size: int = 1000,
             device: torch.device = torch.device("cpu")) -> Evaluation:
    logits, probs = predict_probabilities(model, split.images, batch_size, device)
    labels = split.labels.long()
    k = len(classes)
    pred = probs.argmax(1)
    cm = torch.bincount(labels * k + pred, minlength=k * k).reshape(k, k).numpy()
    ev = Evaluation(
        loss=F.cross_entropy(logits, labels).item(),
        accuracy=(pred == labels).double().mean().item(),
        macro_f1=0.0,
        classes=list(classes),
        confusion=cm,
        predictions=pred.numpy(),
        probabilities=probs.numpy().astype(np.float32),
        logits=logits,
    )
    ev.macro_f1 = float(ev.per_class()["f1"].mean())
    return ev


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace the model (float images in [0, 1] -> logits) into a TorchScript file, atomically."""
    import warnings

    from ..files import atomic_path

    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the file is what Netron opens
        # check_trace reruns the graph through the tracer to compare it (1.2 s of a small model's 1.3 s); one
        # forward pass of each, compared here, proves the same and refuses a model that traces differently.
        traced = torch.jit.trace(model, example.cpu(), check_trace=False)
        with torch.no_grad():
            if not torch.allclose(traced(example.cpu()), model(example.cpu()), rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"{path.name}: the traced model's output differs from the model's")
        with atomic_path(path) as tmp:
            traced.save(str(tmp))
