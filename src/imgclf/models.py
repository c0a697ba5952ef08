"""The two model families, built from params for any input shape and class count.

Every model is wrapped in `Classifier`, which holds the data set's normalization
as buffers: it takes float images in [0, 1] (N, C, H, W), so training, evaluation,
TorchScript export and prediction all preprocess identically.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import CNNConfig, MLPConfig, ModelConfig


def _mlp_layers(sizes: list[int], dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


def build_mlp(cfg: MLPConfig, in_shape: tuple[int, int, int], n_classes: int) -> nn.Sequential:
    c, h, w = in_shape
    sizes = [c * h * w, *cfg.hidden]
    return nn.Sequential(nn.Flatten(), *_mlp_layers(sizes, cfg.dropout), nn.Linear(sizes[-1], n_classes))


def build_cnn(cfg: CNNConfig, in_shape: tuple[int, int, int], n_classes: int) -> nn.Sequential:
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in cfg.channels:
        for _ in range(cfg.convs_per_block):
            layers.append(nn.Conv2d(c, out, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=not cfg.batch_norm))
            if cfg.batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        if min(h, w) >= 2:  # tiny inputs stop shrinking instead of vanishing
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    head = [c * h * w, *cfg.head_hidden]
    return nn.Sequential(*layers, nn.Flatten(), *_mlp_layers(head, cfg.dropout), nn.Linear(head[-1], n_classes))


class Classifier(nn.Module):
    """Normalization (as buffers) followed by a backbone; input is float in [0, 1]."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone((x - self.mean) / self.std)


def build_model(cfg: ModelConfig, in_shape: tuple[int, int, int], n_classes: int,
                mean: list[float] | None = None, std: list[float] | None = None) -> Classifier:
    if n_classes < 2:
        raise ValueError(f"model: need at least 2 classes, got {n_classes}")
    build = build_mlp if cfg.kind == "mlp" else build_cnn
    backbone = build(getattr(cfg, cfg.kind), tuple(in_shape), n_classes)
    channels = in_shape[0]
    return Classifier(backbone, mean or [0.0] * channels, std or [1.0] * channels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def architecture(cfg: ModelConfig, in_shape, n_classes: int, classes: list[str], normalization: dict) -> dict[str, Any]:
    """Everything needed to rebuild the model from a state dict, as plain JSON-able data."""
    import dataclasses

    return {"model": dataclasses.asdict(cfg), "in_shape": list(in_shape), "n_classes": n_classes,
            "classes": list(classes), "normalization": normalization}


def from_architecture(arch: dict[str, Any]) -> Classifier:
    from .config import build

    cfg = build(ModelConfig, arch["model"], "model")
    norm = arch["normalization"]
    return build_model(cfg, tuple(arch["in_shape"]), arch["n_classes"], norm["mean"], norm["std"])
