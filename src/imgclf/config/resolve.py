"""The one place that decides the training settings that run.

Precedence, lowest first: TrainConfig's defaults → the data source's recipe (for keys left null) →
params' `train` section → the model kind's `model.<kind>.train` (its own defaults, as params has
them) → `--set train.*`. The result has no None left: it is what `fit` gets, what the CLI prints,
what MLflow logs as params and what the digest and the checkpoint identity cover.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .experiment import Perturbation, TrainConfig
from .schema import build

RECIPE_KEYS = {"max_epochs": "epochs", "augment_shift": "shift", "augment_flip": "flip"}


def recipe_for(source: str) -> dict[str, Any]:
    """The train.* values a data source decides when params leave them null."""
    from ..data.datasource import data_source

    recipe = data_source(source).recipe
    return {key: getattr(recipe, attr) for key, attr in RECIPE_KEYS.items()}


def resolve_training(params_train: dict, kind: str, kind_train: dict, source: str,
                     overrides: dict[str, Any]) -> TrainConfig:
    """Layer the sources of train.* (see the module's docstring); each layer is validated as it is read."""
    explicit = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("train.")}
    layers = [
        ("train", {k: v for k, v in (params_train or {}).items() if v is not None}),
        (f"model.{kind}.train", {k: v for k, v in (kind_train or {}).items() if v is not None}),
        ("--set train", {k: v for k, v in explicit.items() if v is not None}),
    ]
    merged: dict[str, Any] = dict(recipe_for(source))
    for key, layer in layers:
        build(TrainConfig, layer, key)  # unknown keys and bad values named where they were written
        merged.update(layer)
    resolved = build(TrainConfig, merged, "train")
    assert None not in dataclasses.astuple(resolved), resolved  # every optional key has a recipe value
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
