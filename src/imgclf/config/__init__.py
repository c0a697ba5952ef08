"""Typed, validated configuration, loaded once from params.yaml (plus `--set` overrides).

Every problem is a ConfigError naming the key. `load` returns a Config whose `train` section is
already resolved (resolve.py): a value written in params or `--set` wins for every model kind, keys left
null are decided by the data source and the model kind, and no None is left, so what runs is what is
printed and logged. The dataclasses are the one home of every default; params.yaml writes the same
values out (a test holds the two equal).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..models import KINDS
from ..monitoring.settings import DriftConfig, MonitorConfig
from ..schema import ConfigError, build
from ..sweep.settings import Dimension, SweepConfig
from .environment import DownloadConfig, PathsConfig, RuntimeConfig, Tracking, TrackingConfig
from .experiment import MAX_SEED, DataChecksConfig, DataConfig, EvaluateConfig, Perturbation, RegisterConfig, TrainConfig
from .moved import refuse_old_layout
from .params_file import parse_override, read_params
from .resolve import default_perturbations, resolve_training
from .settings import RESULT_SECTIONS, Config, ModelConfig

__all__ = ["Config", "ConfigError", "DataChecksConfig", "DataConfig", "Dimension", "DownloadConfig", "DriftConfig",
           "EvaluateConfig", "MAX_SEED", "ModelConfig", "MonitorConfig", "PathsConfig", "Perturbation",
           "RESULT_SECTIONS", "RegisterConfig", "RuntimeConfig", "SweepConfig", "TrainConfig", "Tracking",
           "TrackingConfig", "apply_overrides", "build", "from_dict", "load", "parse_override"]


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown paths are caught by `build`."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: {part} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def from_dict(raw: dict, overrides: dict[str, Any] | None = None) -> Config:
    """Validate params and overrides, then resolve the training settings once (resolve.py)."""
    raw, overrides = raw or {}, overrides or {}
    refuse_old_layout(raw, overrides)
    cfg = build(Config, apply_overrides(raw, overrides))
    train = resolve_training(cfg.train, cfg.model.kind, cfg.data.source)
    if cfg.sweep.space:
        check_space(cfg, raw, overrides)
    evaluate = cfg.evaluate
    if evaluate.perturbations is None:
        evaluate = dataclasses.replace(evaluate, perturbations=default_perturbations(cfg.data.source,
                                                                                    train.augment_flip))
    return dataclasses.replace(cfg, train=train, evaluate=evaluate)


def check_space(cfg: Config, raw: dict, overrides: dict[str, Any]) -> None:
    """Every sweep.space key is a hyperparameter (train.<key>, model.<kind>.<key>), and its bounds (or each
    choice) pass that section's checks: a sweep must not find a bad key at trial 7."""
    model = apply_overrides(raw, overrides).get("model") or {}
    for dim in cfg.sweep.dimensions:
        where = f"sweep.space.{dim.key}"
        part = dim.key.split(".")
        if part[0] == "train" and len(part) == 2:
            cls, section, base = TrainConfig, "train", {}
        elif part[0] == "model" and len(part) == 3 and part[1] in KINDS:
            cls, section, base = KINDS[part[1]].params, f"model.{part[1]}", dict(model.get(part[1]) or {})
        else:
            raise ConfigError(f"{where}: not a hyperparameter (search train.<key> or model.<kind>.<key>)")
        if dim.key == "train.max_epochs" and cfg.sweep.max_epochs is not None:
            raise ConfigError(f"{where}: sweep.max_epochs fixes it; set one of the two")
        for value in dim.values:
            try:
                build(cls, {**base, part[-1]: value}, section)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a params file once, apply overrides, validate everything."""
    raw = read_params(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    try:
        return from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
