"""A small residual CNN (ResNet-style basic blocks with batch norm), for RGB ImageFolders at 32-64 px too.

A stem conv, then one stage per `channels` entry: `blocks` basic blocks (conv-BN-ReLU-conv-BN plus the
input, then ReLU), every stage after the first halving the size with a stride-2 first block whose
shortcut is a 1x1 conv. Global average pooling makes the head independent of the image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .layers import positive_widths

# The train.* values this kind decides where params leave them null (a value written there always wins).
TRAIN_DEFAULTS = {"lr": 0.004}


@dataclass(frozen=True)
class Params:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"min_len": 1})
    blocks: int = field(default=1, metadata={"ge": 1, "le": 8})  # basic blocks per stage
    dropout: float = field(default=0.1, metadata={"ge": 0.0, "lt": 1.0})

    def check(self, key: str) -> None:
        positive_widths(self.channels, f"{key}.channels")


def build(p: Params, in_shape: tuple[int, int, int], n_classes: int):
    # torch is imported here, not at the top: validating params (which reads this module) must not need it.
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.shortcut(x))

    c, h, _ = in_shape
    width = p.channels[0]
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    for i, out in enumerate(p.channels):
        for j in range(p.blocks):
            stride = 2 if i > 0 and j == 0 and h >= 2 else 1  # tiny inputs stop shrinking instead of vanishing
            h = (h + 1) // 2 if stride == 2 else h
            layers.append(Block(width, out, stride))
            width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p.dropout),
                         nn.Linear(width, n_classes))
