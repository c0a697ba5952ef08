"""`sweep`: the hyperparameter search (imgclf sweep, the hyperparameter-sweep flow) and its search space.

Not a result section: a sweep's trials run with their own settings, and the pipeline's training
(dvc.yaml, the checkpoint, MLflow params) never reads this section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..schema import ConfigError, bounded, check_plain_name

KINDS_OF_RANGE = ("log_uniform", "uniform", "int", "choice")
# Keys every model kind has; model.<kind>.<key> entries (e.g. model.cnn.dropout) join them in params.yaml.
DEFAULT_SPACE = {"train.lr": {"log_uniform": [0.0005, 0.02]}, "train.weight_decay": {"log_uniform": [1.0e-5, 0.01]},
                 "train.batch_size": {"choice": [64, 128, 256]}, "train.label_smoothing": {"uniform": [0.0, 0.15]}}


@dataclass(frozen=True)
class Dimension:
    """One searched key: `log_uniform` or `uniform` [low, high] floats, `int` [low, high], or `choice` [values]."""

    key: str
    kind: str
    values: tuple


def parse_dimension(key: str, spec: Any) -> Dimension:
    where = f"sweep.space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(k + ': ...' for k in KINDS_OF_RANGE)}}}, "
                          f"got {spec!r}")
    (kind, values), = spec.items()
    if kind not in KINDS_OF_RANGE:
        raise ConfigError(f"{where}: unknown range {kind!r} (use {', '.join(KINDS_OF_RANGE)})")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
    if kind == "choice":
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(f"{where}.choice: values repeat: {values!r}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise ConfigError(f"{where}.choice: only numbers, strings and booleans, got {values!r}")
        return Dimension(key, kind, tuple(values))
    if len(values) != 2:
        raise ConfigError(f"{where}.{kind}: expected [low, high], got {values!r}")
    low, high = values
    number = int if kind == "int" else (int, float)
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}.{kind}: expected {'integers' if kind == 'int' else 'numbers'}, got {values!r}")
    if not all(math.isfinite(v) for v in values) or not low < high:
        raise ConfigError(f"{where}.{kind}: needs finite low < high, got {values!r}")
    if kind == "log_uniform" and low <= 0:
        raise ConfigError(f"{where}.log_uniform: low must be > 0, got {low!r}")
    return Dimension(key, kind, (low, high) if kind == "int" else (float(low), float(high)))


@dataclass(frozen=True)
class SweepConfig:
    study: Optional[str] = None  # None: <registered model name>-<model kind>
    metric: Literal["val_acc", "val_loss"] = "val_acc"  # the kept weights' validation score; never the test set
    trials: int = bounded(20, ge=1, le=100_000)  # finished trials the study ends with (a rerun adds the rest)
    parallel: int = bounded(2, ge=1, le=256)
    max_epochs: Optional[int] = bounded(4, ge=1, le=10_000)  # each trial's train.max_epochs; None: as train
    train_subset: Optional[int] = bounded(12_000, ge=1)  # train images per trial (seeded); None: all
    pruner: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = bounded(3, ge=0)  # median: finished trials before any pruning
    warmup_epochs: int = bounded(1, ge=0)  # median: epochs a trial always gets
    seed: int = bounded(0, ge=0, le=2**32 - 1)  # the sampler's
    baseline: bool = True  # trial 0 runs the params as they are: the yardstick the search must beat
    register: bool = True  # the best trial through evaluate and the promotion gate
    space: dict = field(default_factory=lambda: dict(DEFAULT_SPACE))

    def check(self, key: str) -> None:
        check_plain_name(self.study, f"{key}.study")  # it becomes folder names: models/sweep/<study>/
        for k, spec in self.space.items():
            parse_dimension(k, spec)

    @property
    def dimensions(self) -> list[Dimension]:
        return [parse_dimension(k, spec) for k, spec in self.space.items()]

    def check_kind(self, kind: str) -> None:
        """A model key of another kind is valid params (other commands need not care), but a sweep that trains
        `kind` would search it for nothing."""
        for d in self.dimensions:
            if d.key.startswith("model.") and d.key.split(".")[1] != kind:
                raise ConfigError(f"sweep.space.{d.key}: the sweep trains model.kind={kind}; this key would change "
                                  "nothing")

    def identity(self) -> dict[str, Any]:
        """What a study's trials depend on (not how many, nor how many at once)."""
        return {"metric": self.metric, "max_epochs": self.max_epochs, "train_subset": self.train_subset,
                "pruner": self.pruner, "startup_trials": self.startup_trials, "warmup_epochs": self.warmup_epochs,
                "seed": self.seed, "baseline": self.baseline, "space": self.space}
