"""Layer lists shared by the model kinds (torch imported by the caller's build)."""

from __future__ import annotations


def mlp_layers(sizes: list[int], dropout: float) -> list:
    from torch import nn

    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return layers


MAX_LAYERS = 64  # entries of one width list, a layer or a block each: deeper is a typo or an attempt on memory


def positive_widths(values: list[int], key: str, most: int = 65536) -> None:
    """Every width > 0 and at most `most` (wider is a typo, or an attempt to exhaust memory); at most MAX_LAYERS."""
    if len(values) > MAX_LAYERS:
        raise ValueError(f"{key}: at most {MAX_LAYERS} entries (a layer each), got {len(values)}")
    for v in values:
        if v <= 0 or v > most:
            raise ValueError(f"{key}: every entry must be > 0 and <= {most}, got {values!r}"[:200])
