"""The model as MLflow stores and serves it: torch.export (pt2) graph with softmax, no pickle.

Input: float32 images (N, C, H, W) with values in [0, 1]; output: class probabilities (N, K).
Class names, input shape and normalization travel as the MLflow model's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .imagefolder import decode


class Probabilities(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_model(run_id: str, model: nn.Module, arch: dict[str, Any]) -> str:
    """Log the model to the run (pt2, signature, input example, explicit requirements); return its URI."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    c, h, w = arch["in_shape"]
    k = arch["n_classes"]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]))
    example = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
    wrapped = Probabilities(model.cpu().eval()).eval()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            wrapped, name="model", signature=signature, input_example=example, serialization_format="pt2",
            pip_requirements=pip_requirements(),
            metadata={"classes": arch["classes"], "in_shape": arch["in_shape"],
                      "normalization": arch["normalization"], "input": "float32 (N,C,H,W) in [0,1]"},
        )
    return info.model_uri


class LoadedModel:
    """A registered model loaded through MLflow's pyfunc, with what preprocessing needs."""

    def __init__(self, uri: str):
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            self.pyfunc = mlflow.pyfunc.load_model(uri)
        except MlflowException as exc:
            raise LookupError(f"{uri}: cannot load model ({exc.message.splitlines()[0]})") from None
        meta = self.pyfunc.metadata.metadata or {}
        if "in_shape" not in meta or "classes" not in meta:
            raise LookupError(f"{uri}: not an imgclf model (no classes/in_shape metadata)")
        self.uri = uri
        self.classes: list[str] = list(meta["classes"])
        self.in_shape: list[int] = list(meta["in_shape"])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 (N, C, H, W) -> probabilities (N, K)."""
        x = images.astype(np.float32) / 255.0
        out = self.pyfunc.predict(x)
        return np.asarray(out, dtype=np.float32)

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 2000) -> float:
        correct = 0
        for i in range(0, len(images), batch_size):
            correct += int((self.probabilities(images[i: i + batch_size]).argmax(1) == labels[i: i + batch_size]).sum())
        return correct / max(len(labels), 1)

    def load_images(self, paths: list[str | Path]) -> np.ndarray:
        """Decode files exactly as prepare does (size, channels); a non-image names the file."""
        from .imagefolder import ImageFolderError, check_image

        c, size, _ = self.in_shape
        out = np.empty((len(paths), c, size, size), dtype=np.uint8)
        for i, p in enumerate(paths):
            p = Path(p)
            if not p.is_file():
                raise ImageFolderError(f"{p}: no such file")
            reason = check_image(p)
            if reason:
                raise ImageFolderError(f"{p}: {reason}")
            out[i] = decode(p, size, c)
        return out
