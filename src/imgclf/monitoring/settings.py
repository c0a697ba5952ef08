"""`monitor`: batch inference with the production model and drift against its training data
(imgclf predict-batch, the batch-inference flow). Not a result section: no stage of the training
pipeline reads it, so changing a threshold never makes `dvc repro` retrain."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ..schema import ConfigError, bounded


@dataclass(frozen=True)
class DriftConfig:
    """When a batch counts as drifted; each detector's statistic is in the report (monitoring/drift.py)."""

    enabled: bool = True
    alpha: float = bounded(0.01, gt=0.0, lt=1.0)  # a test flags when its p-value is under this (Bonferroni per family)
    # Image statistics: besides a KS p-value under alpha, the Wasserstein distance in units of the reference's
    # standard deviation must reach this (Evidently's rule for large samples: with 10,000 images any
    # difference is "significant", a shift of a tenth of a spread is one a person would call drift).
    min_stat_shift: float = bounded(0.1, ge=0.0)
    sample: int = bounded(1000, ge=50, le=100_000)  # images per side for the embedding tests (seeded)
    permutations: int = bounded(200, ge=20, le=100_000)  # for the MMD p-value
    max_domain_auc: float = bounded(0.7, gt=0.5, le=1.0)  # held-out AUC of a classifier telling batch from reference
    max_class_shift: float = bounded(0.1, gt=0.0, le=1.0)  # total variation distance of predicted-class shares
    min_images: int = bounded(100, ge=10)  # smaller batches are scored, and drift is reported as not tested

    def check(self, key: str) -> None:
        if 1 / (self.permutations + 1) >= self.alpha:  # the smallest p-value a permutation test can give
            raise ConfigError(f"{key}.permutations: {self.permutations} permutations cannot give a p-value under "
                              f"{key}.alpha={self.alpha}; use at least {math.ceil(1 / self.alpha)}")


@dataclass(frozen=True)
class MonitorConfig:
    inbox: str = "inbox"  # the folder the scheduled batch-inference scores; scored files move to inbox/scored/<batch>
    out_dir: str = "inference"  # one folder per batch: predictions.csv, summary.json, drift report
    model_uri: Optional[str] = None  # None: models:/<register model name>@production
    reference_size: int = bounded(5000, ge=100)  # validation images (seeded) the batch is compared with
    drift: DriftConfig = field(default_factory=DriftConfig)
