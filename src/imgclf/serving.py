"""The model as MLflow stores and serves it: torch.export (pt2) graph with softmax, and the only way
the project loads one back.

Input: float32 images (N, C, H, W) with values in [0, 1]; output: class probabilities (N, K).
Class names, input shape and normalization travel as the MLflow model's metadata.

Loading never unpickles: a model URI can point anywhere a registry user chose, so before
anything is deserialized the model folder must be this project's format (pytorch flavor in
pt2 form, no pickle files, our metadata). The model is then rebuilt from its architecture
record and its weights in safetensors form (plain tensors, no code), which takes a fraction
of a second; a model without them is loaded by MLflow with pickle deserialization off, which
also checks that every record of the pt2 archive is pickle-free. On the embedded store a
registered model's folder is found in the store's own tables, so `imgclf predict` need not
import the MLflow client (seconds on a small machine).
Over 200 lines because this is the one place that decides whether a model is safe to load (URI,
folder, both loaders), and it is reviewed as one.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .imagefolder import ImageFolderError, check_image, decode
from .tracking import embedded_model_folder, scoped_tracking_uri

# Suffixes of files MLflow flavors unpickle; none belongs in a model this project logged.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".joblib", ".cloudpickle", ".dill")
MAX_IMAGE_BYTES = 64 * 2**20
WEIGHTS = "weights.safetensors"  # beside the pt2 graph, in the MLflow model's extra_files/
_MODEL_URI = re.compile(r"models:/[^/@\s]+(@[\w.-]+|/\d+)|runs:/[0-9a-f]{32}/[^\s]+|file://\S+|[^:\s][^:]*")


class ModelFormatError(LookupError):
    """A model URI that does not hold a model of this project's own (safe) format."""


class Probabilities(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(dim=1)


def pip_requirements() -> list[str]:
    import mlflow

    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}"]


def log_model(tracking_uri: str, run_id: str, model: nn.Module, arch: dict[str, Any]) -> str:
    """Log the model to the run (pt2, signature, input example, explicit requirements); return its URI."""
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
    wrapped = Probabilities(model).eval()
    with tempfile.TemporaryDirectory(prefix="imgclf-weights-") as tmp, \
            scoped_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        weights = Path(tmp) / WEIGHTS
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        info = mlflow.pytorch.log_model(
            wrapped, name="model", signature=signature, input_example=example, serialization_format="pt2",
            pip_requirements=pip_requirements(), extra_files=[str(weights)],
            metadata={"classes": arch["classes"], "in_shape": arch["in_shape"], "architecture": arch,
                      "normalization": arch["normalization"], "input": "float32 (N,C,H,W) in [0,1]"},
        )
    return info.model_uri


@contextlib.contextmanager
def _pickle_off() -> Iterator[None]:
    old = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = old


def check_model_uri(uri: Any) -> str:
    if not isinstance(uri, str) or not _MODEL_URI.fullmatch(uri) or "\x00" in uri:
        raise ModelFormatError(f"{uri!r}: not a model URI (expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                               "runs:/RUN_ID/PATH or a local model folder)")
    return uri


def check_model_folder(uri: str, folder: Path) -> dict[str, Any]:
    """The MLmodel's metadata, once the folder is known to hold this project's format; else ModelFormatError."""
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise ModelFormatError(f"{uri}: no MLmodel file; not an MLflow model")
    try:
        spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{uri}: unreadable MLmodel ({type(exc).__name__})") from None
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    if not isinstance(flavors, dict):
        raise ModelFormatError(f"{uri}: MLmodel lists no flavors")
    torch_flavor = flavors.get("pytorch") or {}
    loader = (flavors.get("python_function") or {}).get("loader_module")
    if set(flavors) != {"pytorch", "python_function"} or loader != "mlflow.pytorch" \
            or not isinstance(torch_flavor, dict) or torch_flavor.get("model_data") != "data":
        raise ModelFormatError(f"{uri}: flavors {sorted(flavors)} (python_function loader {loader}); "
                               "refused: only imgclf's own pytorch pt2 models are loaded")
    if not (folder / "data" / "model.pt2").is_file():
        raise ModelFormatError(f"{uri}: no data/model.pt2; refused: only torch.export (pt2) models are loaded")
    pickled = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ModelFormatError(f"{uri}: holds pickle files ({', '.join(pickled[:3])}); refused")
    meta = spec.get("metadata") or {}
    if not isinstance(meta, dict) or "in_shape" not in meta or "classes" not in meta:
        raise ModelFormatError(f"{uri}: not an imgclf model (no classes/in_shape metadata)")
    return meta


class LoadedModel:
    """A model of this project's format, fetched from `uri` and loaded without unpickling anything."""

    def __init__(self, uri: str, tracking_uri: str):
        check_model_uri(uri)
        self.uri = uri
        folder = embedded_model_folder(uri, tracking_uri)
        if folder is not None:
            self._load(folder)
            return
        from mlflow.exceptions import MlflowException

        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr keeps to log lines
        # download_artifacts resolves models:/ through the process-wide registry URI whatever its
        # arguments say (without the scope: ./mlflow.db, created empty in the working directory).
        with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp, scoped_tracking_uri(tracking_uri):
            try:
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp,
                                                                  tracking_uri=tracking_uri,
                                                                  registry_uri=tracking_uri))
            except (MlflowException, OSError, ValueError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                raise LookupError(f"{uri}: cannot load model ({message.strip().splitlines()[0][:200]})") from None
            self._load(folder)

    def _load(self, folder: Path) -> None:
        meta = check_model_folder(self.uri, folder)
        weights = folder / "extra_files" / WEIGHTS
        if weights.is_file() and isinstance(meta.get("architecture"), dict):
            self.module = Probabilities(_rebuild(self.uri, meta["architecture"], weights)).eval()
        else:  # logged before the weights travelled as safetensors
            from mlflow.exceptions import MlflowException

            import mlflow

            try:
                with _pickle_off():
                    self.module = mlflow.pytorch.load_model(str(folder))
            except MlflowException as exc:
                raise ModelFormatError(f"{self.uri}: refused by the pickle-free loader "
                                       f"({exc.message.strip().splitlines()[0][:200]})") from None
        self.classes: list[str] = [str(c) for c in meta["classes"]]
        self.in_shape: list[int] = [int(v) for v in meta["in_shape"]]

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """images: uint8 (N, C, H, W) -> probabilities (N, K)."""
        x = torch.from_numpy(images.astype(np.float32) / 255.0)
        return self.module(x).float().numpy()

    def accuracy(self, images: np.ndarray, labels: np.ndarray, batch_size: int = 2000) -> float:
        correct = 0
        for i in range(0, len(images), batch_size):
            correct += int((self.probabilities(images[i: i + batch_size]).argmax(1) == labels[i: i + batch_size]).sum())
        return correct / max(len(labels), 1)

    def load_images(self, paths: list[str | Path]) -> np.ndarray:
        """Decode files exactly as prepare does (size, channels)."""
        c, size, _ = self.in_shape
        out = np.empty((len(paths), c, size, size), dtype=np.uint8)
        for i, p in enumerate(paths):
            out[i] = decode(Path(p), size, c)
        return out


def _rebuild(uri: str, arch: dict[str, Any], weights: Path) -> nn.Module:
    """Our model from its architecture record and safetensors weights; anything that does not fit is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import from_architecture
    from .schema import ConfigError

    try:
        with torch.device("meta"):  # nothing allocated until the weights on disk are known to fit
            model = from_architecture(arch)
        model.load_state_dict(load_file(str(weights)), strict=True, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            raise ValueError("some tensors have no weights")
    except (ConfigError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelFormatError(f"{uri}: its weights do not fit its architecture record "
                               f"({str(exc).splitlines()[0][:200]})") from None
    return model.eval()


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
