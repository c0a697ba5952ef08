"""What evaluate measures beyond accuracy, for the model card and the gate: calibration (with the temperature
the served model applies) and the behavioural tests; and the files that show them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import EvaluateConfig
from ..data.batches import Split
from ..files import atomic_path
from .calibration import Calibration, calibrate
from .robustness import robustness, table
from .scoring import Evaluation, predict_probabilities


@dataclass
class Trust:
    calibration: Calibration
    robustness: list[dict[str, Any]]
    low_confidence: float  # the threshold
    flagged: float  # share of test images under it, as served
    flagged_accuracy: Optional[float]  # accuracy on them (None when none is flagged)

    def metrics(self) -> dict[str, float]:
        """Single numbers for test.json and MLflow (robustness per test as robust_<test>_acc)."""
        out: dict[str, float] = {**self.calibration.metrics(), "low_confidence_share": self.flagged}
        for r in self.robustness[1:]:
            out[f"robust_{r['test']}_acc"] = r["accuracy"]
        return out

    def record(self) -> dict[str, Any]:
        """What the gate reads (logged_model.json): served calibration and each gated test's result."""
        return {"ece": self.calibration.ece, "ece_before_scaling": self.calibration.ece_before,
                "temperature": self.calibration.temperature,
                "robustness": [{k: r[k] for k in ("test", "accuracy", "drop", "max_drop", "passed")}
                               for r in self.robustness[1:]]}


def assess(model: nn.Module, val: Split, test: Split, ev: Evaluation, cfg: EvaluateConfig, batch_size: int,
           info: Callable[..., None]) -> Trust:
    val_logits, _ = predict_probabilities(model, val.images, batch_size, torch.device("cpu"))
    cal = calibrate(val_logits, val.labels.long(), ev.logits, test.labels.long(), cfg.calibration_bins, cfg.calibrate)
    info("calibration: ECE %.4f from the raw softmax, %.4f with temperature %.4f (fitted on %d validation images)",
         cal.ece_before, cal.ece, cal.temperature, len(val))

    rows = robustness(model, test, ev.classes, ev.predictions, list(cfg.perturbations or []), batch_size)
    for r in rows[1:]:
        limit = "not gated" if r["max_drop"] is None else f"limit {r['max_drop']:.2%}: {'pass' if r['passed'] else 'FAIL'}"
        info("behavioural test %-10s accuracy %.2f%% (drop %+.2f%%, %s)", r["test"], 100 * r["accuracy"],
             100 * r["drop"], limit)
    served = (ev.logits.double() / cal.temperature).softmax(1)
    top, pred = served.max(1)
    low = top < cfg.low_confidence
    hits = (pred == test.labels.long())[low]
    return Trust(cal, rows, cfg.low_confidence, float(low.double().mean()) if len(low) else 0.0,
                 float(hits.double().mean()) if len(hits) else None)


def write_trust_reports(out: Path, trust: Trust, classes: list[str]) -> list[Path]:
    """robustness.csv and .png, reliability.png, calibration.json."""
    from .plots import behaviour, reliability_diagram, save

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "robustness.csv", out / "calibration.json"]
    with atomic_path(written[0]) as tmp:
        table(trust.robustness, classes).to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(written[1]) as tmp:
        tmp.write_text(json.dumps({**trust.calibration.as_dict(), "low_confidence": trust.low_confidence,
                                   "low_confidence_share": trust.flagged,
                                   "low_confidence_accuracy": trust.flagged_accuracy}, indent=2) + "\n")
    written.append(save(behaviour(trust.robustness, classes), out / "robustness.png"))
    written.append(save(reliability_diagram(trust.calibration.as_dict()), out / "reliability.png"))
    return written
