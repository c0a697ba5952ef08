"""Score a batch in one pass: calibrated probabilities and the penultimate layer's embeddings.

The embedding is the input of the network's last linear layer (the classifier head's), taken with a
forward hook: every model kind here ends in one, and nothing of the model is re-implemented.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ..progress import Progress


def last_linear(network: nn.Module) -> nn.Linear:
    layers = [m for m in network.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError("the model has no linear layer to take embeddings from")
    return layers[-1]


@torch.no_grad()
def score(network: nn.Module, temperature: float, images: np.ndarray, batch_size: int = 1000,
          progress: Optional[Progress] = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) -> probabilities (N, K) with the temperature applied, embeddings (N, D)."""
    captured: list[torch.Tensor] = []
    hook = last_linear(network).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    probs, embeddings = [], []
    network.eval()
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i: i + batch_size].astype(np.float32) / 255.0)
            captured.clear()
            logits = network(x)
            probs.append((logits.float() / temperature).softmax(1).numpy())
            embeddings.append(captured[-1].float().flatten(1).numpy())
            if progress:
                progress("score", min(i + batch_size, len(images)), len(images))
    finally:
        hook.remove()
    return np.concatenate(probs), np.concatenate(embeddings)
