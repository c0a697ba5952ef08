"""Named training recipes: a few params written once, applied on top of a config where a stage wants a known
schedule rather than the pipeline's (the audit's cross-validation, the speed race of bench/time_to_accuracy.py).

`fast`: two epochs of a small CNN (one conv per block), batch 64, AdamW with OneCycle over those two epochs, no
augmentation, the last epoch's weights. On real MNIST it reaches a mean of 99.18 % test accuracy over 5 seeds
in 17 s of training on 2 cores (bench/time_to_accuracy.py; one epoch gave exactly 99.00 %, too close).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "fast": {"model.kind": "cnn", "model.cnn.channels": [16, 32, 64], "model.cnn.convs_per_block": 1,
             "train.batch_size": 64, "train.lr": 0.006, "train.max_epochs": 2, "train.augment_shift": 0,
             "train.keep": "last"},
}


def recipe(name: str) -> dict[str, Any]:
    """The overrides of recipe `name` (dotted keys, as --set takes them)."""
    if name not in RECIPES:
        raise KeyError(f"no recipe {name!r} (recipes: {', '.join(RECIPES)})")
    return dict(RECIPES[name])
