"""A multilayer perceptron on the flattened image."""

from __future__ import annotations

from dataclasses import dataclass, field

from .layers import mlp_layers, positive_widths

# The train.* values this kind decides where params leave them null (a value written there always wins).
# MLP epochs are cheap (about 2.4 s on 2 CPU cores), and it wants a lower rate than the conv nets.
TRAIN_DEFAULTS = {"lr": 0.001, "augment_shift": 1, "max_epochs": 24}


@dataclass(frozen=True)
class Params:
    hidden: list[int] = field(default_factory=lambda: [512, 256], metadata={"min_len": 1})
    dropout: float = field(default=0.1, metadata={"ge": 0.0, "lt": 1.0})

    def check(self, key: str) -> None:
        positive_widths(self.hidden, f"{key}.hidden")


def build(p: Params, in_shape: tuple[int, int, int], n_classes: int):
    from torch import nn

    c, h, w = in_shape
    sizes = [c * h * w, *p.hidden]
    return nn.Sequential(nn.Flatten(), *mlp_layers(sizes, p.dropout), nn.Linear(sizes[-1], n_classes))
