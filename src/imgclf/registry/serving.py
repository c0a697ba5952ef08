"""The model as MLflow stores and serves it: torch.export (pt2) graph with softmax, and the only way
the project loads one back.

Input: float32 images (N, C, H, W) with values in [0, 1]; output: class probabilities (N, K).
Class names, input shape and normalization travel as the MLflow model's metadata.

Loading never unpickles and never imports: a model URI can point anywhere a registry user chose,
so no MLflow loader is ever called on it (they unpickle, or put the model's `code/` folder first
on sys.path). Only two files are read: MLmodel (YAML, checked to be this project's format and
shapes) and the weights in safetensors form (plain tensors); the module is rebuilt from the
architecture record. A folder on this machine is read in place; from an artifact store only those
two files are fetched. On the embedded store a registered model's folder is found in the store's
own tables, so `imgclf predict` need not import the MLflow client (seconds on a small machine).
What makes a model safe to load (URI, MLmodel spec, folders, weights) is decided in model_files.py.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..data.imagefolder import ImageFolderError, check_image, decode
from ..files import sha256_file
from ..tracking.mlflow_internals import embedded_model_folder, scoped_tracking_uri
from .model_files import (
    MAX_MLMODEL_BYTES,
    WEIGHTS,
    LocalFolder,
    ModelFormatError,
    RemoteFolder,
    check_model_spec,
    check_model_uri,
    local_folder,
    rebuild,
    refuse,
)

MAX_IMAGE_BYTES = 64 * 2**20


class Probabilities(nn.Module):
    """Calibrated class probabilities: softmax of the logits divided by the fitted temperature."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) / self.temperature).softmax(dim=1)


def check_temperature(uri: str, value: Any) -> float:
    """A temperature from a model's metadata: a number in the range evaluate searches, else refused."""
    from ..evaluation.calibration import T_MAX, T_MIN

    if value is None:  # logged before calibration existed: raw softmax
        return 1.0
    if type(value) not in (int, float) or not T_MIN <= value <= T_MAX:
        raise refuse(uri, f"metadata temperature {str(value)[:40]} is not a number in [{T_MIN}, {T_MAX}]")
    return float(value)


def pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_model(tracking_uri: str, run_id: str, model: nn.Module, arch: dict[str, Any], temperature: float = 1.0) -> str:
    """Log the model to the run (pt2 with the temperature applied, signature, input example, explicit
    requirements); return its URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    import mlflow

    c, h, w = arch["in_shape"]
    k = arch["n_classes"]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))]))
    example = np.random.default_rng(0).random((2, c, h, w), dtype=np.float32)
    model = model.cpu().eval()
    wrapped = Probabilities(model, check_temperature("log_model", temperature)).eval()
    with tempfile.TemporaryDirectory(prefix="imgclf-weights-") as tmp, \
            scoped_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        weights = Path(tmp) / WEIGHTS
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        info = mlflow.pytorch.log_model(
            wrapped, name="model", signature=signature, input_example=example, serialization_format="pt2",
            pip_requirements=pip_requirements(), extra_files=[str(weights)],
            metadata={"classes": arch["classes"], "in_shape": arch["in_shape"], "architecture": arch,
                      "normalization": arch["normalization"], "input": "float32 (N,C,H,W) in [0,1]",
                      "temperature": float(temperature)},
        )
    return info.model_uri


class LoadedModel:
    """A model of this project's format, read from `uri` without unpickling or importing anything from it:
    the module is rebuilt from the architecture record and filled with the safetensors weights."""

    def __init__(self, uri: str, tracking_uri: str):
        check_model_uri(uri)
        self.uri = uri
        local = local_folder(uri)
        found = (local, None) if local is not None else embedded_model_folder(uri, tracking_uri)
        if found is not None:
            if not found[0].is_dir():
                raise LookupError(f"{uri}: no such model folder")
            self._load(LocalFolder(uri, *found))
            return
        from mlflow.exceptions import MlflowException

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr keeps to log lines
        # models:/ resolves through the process-wide registry URI whatever the arguments say (without the
        # scope: ./mlflow.db, created empty in the working directory).
        with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp, scoped_tracking_uri(tracking_uri):
            try:
                self._load(RemoteFolder(uri, tracking_uri, Path(tmp)))
            except (MlflowException, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                raise LookupError(f"{uri}: cannot load model ({message.strip().splitlines()[0][:200]})") from None

    def _load(self, folder: LocalFolder | RemoteFolder) -> None:
        import yaml

        names = folder.names()
        if "MLmodel" not in names:
            raise ModelFormatError(f"{self.uri}: no MLmodel file; not an MLflow model")
        mlmodel = folder.fetch("MLmodel")
        if not mlmodel.is_file():  # a FIFO or device would block or never end
            raise refuse(self.uri, "MLmodel is not a regular file")
        if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
            raise refuse(self.uri, f"MLmodel larger than {MAX_MLMODEL_BYTES // 1024} KiB")
        try:
            spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{self.uri}: unreadable MLmodel ({type(exc).__name__})") from None
        meta = check_model_spec(self.uri, spec, names)
        weights = folder.fetch(f"extra_files/{WEIGHTS}")
        if not weights.is_file():
            raise refuse(self.uri, f"extra_files/{WEIGHTS} is not a regular file")
        self.network = rebuild(self.uri, meta["architecture"], weights)  # logits, as scoring.evaluate takes
        self.temperature = check_temperature(self.uri, meta.get("temperature"))
        self.module = Probabilities(self.network, self.temperature).eval()
        self.classes: list[str] = list(meta["classes"])
        self.in_shape: list[int] = list(meta["in_shape"])
        self.version: Optional[str] = folder.version  # the registry version that answered, for models:/ URIs
        self.weights_sha256 = sha256_file(weights)  # what exactly answers (imgclf serve says it in each response)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 (N, C, H, W) -> probabilities (N, K)."""
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        return self.module(x).float().numpy()

    def load_images(self, paths: list[str | Path]) -> np.ndarray:
        """Decode files exactly as prepare does (size, channels)."""
        c, size, _ = self.in_shape
        out = np.empty((len(paths), c, size, size), dtype=np.uint8)
        for i, p in enumerate(paths):
            out[i] = decode(Path(p), size, c)
        return out


def check_images(paths: list[str | Path]) -> None:
    """Every input exists, is not huge, and decodes; the first bad one is named."""
    for p in map(Path, paths):
        if not p.is_file():
            raise ImageFolderError(f"{p}: no such file")
        if p.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageFolderError(f"{p}: larger than {MAX_IMAGE_BYTES // 2**20} MiB; not an input image")
        reason = check_image(p)
        if reason:
            raise ImageFolderError(f"{p}: {reason}")
