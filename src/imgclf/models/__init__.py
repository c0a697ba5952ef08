"""The model registry: each kind is a module with its params (a dataclass) and a `build` function.

Importing this package does not import torch: params validation (config) reads the registry, and a
`download` or `ui` command should not wait for torch. Adding a kind is one module and one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from . import cnn, mlp, rescnn


@dataclass(frozen=True)
class Kind:
    params: type  # a frozen dataclass: the kind's hyperparameters
    module: ModuleType  # has build(params, in_shape, n_classes) -> torch.nn.Module, and TRAIN_DEFAULTS

    @property
    def train_defaults(self) -> dict:
        """The train.* values this kind decides where params leave them null (always lr)."""
        return dict(self.module.TRAIN_DEFAULTS)

    def build(self, params, in_shape: tuple[int, int, int], n_classes: int):
        return self.module.build(params, in_shape, n_classes)


KINDS: dict[str, Kind] = {
    "mlp": Kind(mlp.Params, mlp),
    "cnn": Kind(cnn.Params, cnn),
    "rescnn": Kind(rescnn.Params, rescnn),
}


def kind(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"model.kind: {name!r} is not a known model kind ({', '.join(KINDS)})") from None
