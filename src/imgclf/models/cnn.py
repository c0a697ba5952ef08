"""The default CNN: blocks of conv (→ batch norm) → ReLU, each block max-pooled, then a small MLP head."""

from __future__ import annotations

from dataclasses import dataclass, field

from .layers import mlp_layers, positive_widths

# The train.* values this kind decides where params leave them null (a value written there always wins).
TRAIN_DEFAULTS = {"lr": 0.004}


@dataclass(frozen=True)
class Params:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"min_len": 1})
    convs_per_block: int = field(default=2, metadata={"ge": 1, "le": 8})
    kernel_size: int = field(default=3, metadata={"ge": 1, "le": 11})
    batch_norm: bool = True
    head_hidden: list[int] = field(default_factory=lambda: [128])
    dropout: float = field(default=0.25, metadata={"ge": 0.0, "lt": 1.0})

    def check(self, key: str) -> None:
        positive_widths(self.channels, f"{key}.channels")
        positive_widths(self.head_hidden, f"{key}.head_hidden")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"{key}.kernel_size: must be odd so padding keeps the size, got {self.kernel_size}")


def build(p: Params, in_shape: tuple[int, int, int], n_classes: int):
    from torch import nn

    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in p.channels:
        for _ in range(p.convs_per_block):
            layers.append(nn.Conv2d(c, out, p.kernel_size, padding=p.kernel_size // 2, bias=not p.batch_norm))
            if p.batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        if min(h, w) >= 2:  # tiny inputs stop shrinking instead of vanishing
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
    head = [c * h * w, *p.head_hidden]
    return nn.Sequential(*layers, nn.Flatten(), *mlp_layers(head, p.dropout), nn.Linear(head[-1], n_classes))
