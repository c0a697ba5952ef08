"""The one place that decides the training settings that run.

A value written in params' `train` section (or set by `--set train.*`, or by `dvc exp run -S train.*`, which
writes that section) always wins, for every model kind. Only a key left null there is decided, lowest first,
by the data source's recipe (epochs, shifts, mirroring) and then by the model kind's TRAIN_DEFAULTS
(imgclf.models: always lr; the MLP also its epochs and shifts). The result has no None left: it is what
`fit` gets, what the CLI prints, what MLflow logs as params and what the digest and checkpoint identity cover.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..models import KINDS
from ..schema import build
from .experiment import Perturbation, TrainConfig

RECIPE_KEYS = {"max_epochs": "epochs", "augment_shift": "shift", "augment_flip": "flip"}


def recipe_for(source: str) -> dict[str, Any]:
    """The train.* values a data source decides when params leave them null."""
    from ..data.datasource import data_source

    recipe = data_source(source).recipe
    return {key: getattr(recipe, attr) for key, attr in RECIPE_KEYS.items()}


def resolve_training(written: TrainConfig, kind: str, source: str) -> TrainConfig:
    """Fill the null keys of the written `train` section (see the module's docstring)."""
    merged: dict[str, Any] = {**recipe_for(source), **KINDS[kind].train_defaults}
    merged.update({k: v for k, v in dataclasses.asdict(written).items() if v is not None})
    resolved = build(TrainConfig, merged, "train")
    assert None not in dataclasses.astuple(resolved), resolved  # every nullable key has a recipe or kind value
    return resolved


def default_perturbations(source: str, mirror_keeps_class: bool) -> list[Perturbation]:
    """evaluate.perturbations left null: shifts, a rotation and light noise, gated by the source's limits;
    stronger noise and inverted contrast as information (most data sets have one polarity); mirroring where
    it keeps the class (train.augment_flip)."""
    from ..data.datasource import data_source

    recipe = data_source(source).recipe
    tests = [Perturbation("shift", 1.0, 0.01), Perturbation("shift", 2.0, 0.05),
             Perturbation("rotate", 10.0, recipe.rotate_drop), Perturbation("noise", 0.05, recipe.noise_drop),
             Perturbation("noise", 0.1, None), Perturbation("invert", 1.0, None)]
    if mirror_keeps_class:
        tests.append(Perturbation("flip", 1.0, 0.02))
    return tests
