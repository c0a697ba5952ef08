"""Calibration: expected calibration error, the reliability diagram's bins, and temperature scaling fitted on
the validation split, so that a served probability of 0.9 is right about 9 times in 10.

The ECE is torchmetrics' `multiclass_calibration_error` (L1, equal-width bins) written out in a few lines:
importing torchmetrics pulls in torchvision's models, scipy.signal and torch._dynamo, and cost every evaluate
3.3 to 4.4 s on top of torch's own 1.3 to 2.4 s (2 cores). The temperature is a golden-section search of a few
lines rather than scipy.optimize.minimize_scalar, for the reason drift.py gives (scipy's optimizer imports
torch's compiler). tests/test_trust.py checks both against those libraries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.05, 20.0  # the temperatures searched; log_model refuses anything else


def ece(probabilities: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """Top-label expected calibration error (L1, equal-width bins), as torchmetrics computes it: a confidence
    on a boundary goes to the bin above it, and a confidence of exactly 1 is a bin of its own."""
    if not len(labels):
        return 0.0
    conf, pred = probabilities.float().max(1)
    correct = (pred == labels.long()).float()
    which = torch.bucketize(conf, torch.linspace(0, 1, bins + 1), right=True) - 1
    count = torch.zeros(bins + 1).scatter_add_(0, which, torch.ones_like(conf))
    safe = count.clamp(min=1)
    gap = torch.zeros(bins + 1).scatter_add_(0, which, correct) / safe - \
        torch.zeros(bins + 1).scatter_add_(0, which, conf) / safe
    return float((gap.abs() * count / count.sum()).sum())


def reliability(probabilities: torch.Tensor, labels: torch.Tensor, bins: int) -> dict[str, list[float]]:
    """Per equal-width confidence bin: mean confidence, accuracy and count (the diagram's bars)."""
    conf, pred = probabilities.max(1)
    correct = (pred == labels).double()
    which = torch.clamp((conf.double() * bins).long(), max=bins - 1)
    count = torch.bincount(which, minlength=bins).double()
    safe = count.clamp(min=1)
    return {"confidence": (torch.bincount(which, conf.double(), bins) / safe).tolist(),
            "accuracy": (torch.bincount(which, correct, bins) / safe).tolist(), "count": count.tolist()}


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the validation NLL. NLL is convex in the inverse temperature, so a golden
    section search on [1/T_MAX, 1/T_MIN] finds the optimum without an optimiser's settings to tune."""
    if not len(labels):
        return 1.0
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    phi = (math.sqrt(5) - 1) / 2
    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fa, fb = nll(logits, labels, 1 / a), nll(logits, labels, 1 / b)
    for _ in range(60):  # the bracket shrinks to 0.618^60 of its width: far below a meaningful digit
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - phi * (hi - lo)
            fa = nll(logits, labels, 1 / a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = nll(logits, labels, 1 / b)
    return round(2.0 / (lo + hi), 6)


@dataclass
class Calibration:
    temperature: float  # 1.0 when evaluate.calibrate is false
    ece_before: float  # on the test split, softmax of the raw logits
    ece: float  # on the test split, as the model serves (logits / temperature)
    nll_before: float
    nll: float
    bins: int
    diagram_before: dict
    diagram: dict

    def metrics(self) -> dict[str, float]:
        return {"ece": self.ece, "ece_before_scaling": self.ece_before, "temperature": self.temperature,
                "nll_after_scaling": self.nll}

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
              test_labels: torch.Tensor, bins: int, fit: bool) -> Calibration:
    t = fit_temperature(val_logits, val_labels) if fit else 1.0
    before, after = test_logits.softmax(1), (test_logits.double() / t).softmax(1).float()
    return Calibration(t, ece(before, test_labels, bins), ece(after, test_labels, bins),
                       nll(test_logits, test_labels, 1.0), nll(test_logits, test_labels, t), bins,
                       reliability(before, test_labels, bins), reliability(after, test_labels, bins))
