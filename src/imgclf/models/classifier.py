"""A model of any registered kind, wrapped with its data set's normalization, and its architecture record.

`Classifier` holds the normalization as buffers: it takes float images in [0, 1] (N, C, H, W), so
training, evaluation, TorchScript export and prediction all preprocess identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..schema import ConfigError, build
from . import KINDS
from . import kind as find_kind


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """What building a network needs of config's `model` section: the kind and that kind's params."""

    kind: str
    active: Any


class Classifier(nn.Module):
    """Normalization (as buffers) followed by a backbone; input is float in [0, 1]."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def build_model(model_cfg, in_shape: tuple[int, int, int], n_classes: int,
                mean: list[float] | None = None, std: list[float] | None = None) -> Classifier:
    """`model_cfg`: config's `model` section (its kind and that kind's params)."""
    if n_classes < 2:
        raise ValueError(f"model: need at least 2 classes, got {n_classes}")
    backbone = find_kind(model_cfg.kind).build(model_cfg.active, tuple(in_shape), n_classes)
    channels = in_shape[0]
    return Classifier(backbone, mean or [0.0] * channels, std or [1.0] * channels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def architecture(model_cfg, in_shape, n_classes: int, classes: list[str], normalization: dict) -> dict[str, Any]:
    """Everything needed to rebuild the model from a state dict, as plain JSON-able data: the kind and its
    params only (training defaults and the other kinds' settings do not shape the weights)."""
    params = {k: v for k, v in dataclasses.asdict(model_cfg.active).items() if k != "train"}
    return {"model": {"kind": model_cfg.kind, model_cfg.kind: params}, "in_shape": list(in_shape),
            "n_classes": n_classes, "classes": list(classes), "normalization": normalization}


def from_architecture(arch: dict[str, Any]) -> Classifier:
    """Rebuild from a record; records of older versions (every kind's section, with `train`) read too."""
    record = arch["model"]
    name = record["kind"]
    section = {k: v for k, v in record[name].items() if k != "train"} if isinstance(record.get(name), dict) else {}
    if not isinstance(name, str) or name not in KINDS:  # a record is anyone's file: named, never looked up blindly
        raise ConfigError(f"model.kind: must be one of {', '.join(KINDS)}; got {str(name)[:80]!r}")
    cfg = ModelChoice(name, build(KINDS[name].params, section, f"model.{name}"))
    norm = arch["normalization"]
    return build_model(cfg, tuple(arch["in_shape"]), arch["n_classes"], norm["mean"], norm["std"])
