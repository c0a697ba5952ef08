"""Typed, validated configuration, loaded once from params.yaml (plus `--set` overrides).

Every problem is a ConfigError naming the key. `load` returns a Config whose `train` section is
already resolved (resolve.py): no None left, so what runs is what is printed and logged.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from ..models import KINDS
from .environment import DownloadConfig, PathsConfig, RuntimeConfig, Tracking, TrackingConfig
from .experiment import MAX_SEED, DataConfig, EvaluateConfig, RegisterConfig, TrainConfig
from .moved import refuse_old_layout
from .params_file import parse_override, read_params
from .resolve import resolve_training
from .schema import ConfigError, build
from .settings import RESULT_SECTIONS, Config, ModelConfig

__all__ = ["Config", "ConfigError", "DataConfig", "DownloadConfig", "EvaluateConfig", "MAX_SEED", "ModelConfig",
           "PathsConfig", "RESULT_SECTIONS", "RegisterConfig", "RuntimeConfig", "TrainConfig", "Tracking",
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
    """Validate params and overrides, then resolve the training settings once."""
    raw, overrides = raw or {}, overrides or {}
    refuse_old_layout(raw, overrides)
    cfg = build(Config, apply_overrides(raw, overrides))
    for name in KINDS:  # every kind's train defaults, not only the active one's: a typo waits for nobody
        build(TrainConfig, getattr(cfg.model, name).train, f"model.{name}.train")
    params_train = apply_overrides(raw, {k: v for k, v in overrides.items() if not k.startswith("train.")})
    kind = cfg.model.kind
    train = resolve_training(params_train.get("train") or {}, kind, cfg.model.active.train, cfg.data.source,
                             overrides)
    return dataclasses.replace(cfg, train=train)


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a params file once, apply overrides, validate everything."""
    raw = read_params(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    try:
        return from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
