"""`audit`: imgclf audit, the label-error and near-duplicate search over the prepared splits. Not a result
section: no model the pipeline registers is trained with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..schema import bounded


@dataclass(frozen=True)
class AuditConfig:
    folds: int = bounded(4, ge=2, le=20)  # cross-validation folds over train + validation, stratified, seeded
    recipe: Literal["fast"] = "fast"  # every fold's training: imgclf.training.recipes (a test keeps the names equal)
    seed: int = bounded(0, ge=0)  # the folds' draw and the models' initialisation
    # Two images are near-duplicates when their pixel correlation, the best over shifts of up to one pixel
    # after centring each on its centre of mass, reaches this (audit/near_duplicates.py says how it was chosen).
    near_duplicate_threshold: float = bounded(0.99, gt=0.0, le=1.0)
    shown: int = bounded(24, ge=1, le=400)  # images in label_issues.png and near_duplicates.png
