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
Over 200 lines because this is the one place that decides whether a model is safe to load (URI,
spec, folder, weights), and it is reviewed as one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .imagefolder import ImageFolderError, check_image, decode
from .mlflow_internals import artifact_repository, embedded_model_folder, scoped_tracking_uri

# Suffixes of files MLflow flavors unpickle; none belongs in a model this project logged.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".joblib", ".cloudpickle", ".dill")
MAX_IMAGE_BYTES = 64 * 2**20
MIN_SIDE, MAX_SIDE, MAX_CLASSES = 4, 2048, 100_000  # data.image_size's bounds
MAX_MODEL_FILES, MAX_MLMODEL_BYTES = 10_000, 1 << 20
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


def check_model_uri(uri: Any) -> str:
    if not isinstance(uri, str) or not _MODEL_URI.fullmatch(uri) or "\x00" in uri:
        raise ModelFormatError(f"{uri!r}: not a model URI (expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                               "runs:/RUN_ID/PATH or a local model folder)")
    return uri


def _refuse(uri: str, why: str) -> ModelFormatError:
    return ModelFormatError(f"{uri}: {why}; refused: only imgclf's own models (architecture record + safetensors "
                            "weights) are loaded")


def _check_shape(uri: str, meta: dict[str, Any], arch: dict[str, Any]) -> None:
    """Shapes and class lists bounded and consistent before anything is allocated from them."""
    in_shape, classes = meta.get("in_shape"), meta.get("classes")
    if not (isinstance(in_shape, list) and len(in_shape) == 3 and all(type(v) is int for v in in_shape)
            and in_shape[0] in (1, 3) and all(MIN_SIDE <= v <= MAX_SIDE for v in in_shape[1:])):
        raise _refuse(uri, f"metadata in_shape {str(in_shape)[:80]} is not [1 or 3, {MIN_SIDE}..{MAX_SIDE}, "
                           f"{MIN_SIDE}..{MAX_SIDE}]")
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        raise _refuse(uri, f"metadata classes must be 2..{MAX_CLASSES} names")
    if arch.get("in_shape") != in_shape or arch.get("classes") != classes or arch.get("n_classes") != len(classes):
        raise _refuse(uri, "metadata in_shape/classes differ from its architecture record")


def check_model_spec(uri: str, spec: Any, names: set[str]) -> dict[str, Any]:
    """The MLmodel's metadata, once the spec and the folder's file list are this project's format.

    `names` are the folder's files (relative POSIX paths). No flavor may name code to import: MLflow's
    loaders put such a folder first on sys.path, so the next lazy import would come from the model.
    """
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    if not isinstance(flavors, dict):
        raise ModelFormatError(f"{uri}: MLmodel lists no flavors")
    torch_flavor = flavors.get("pytorch")
    pyfunc = flavors.get("python_function")
    if set(flavors) != {"pytorch", "python_function"} or not isinstance(torch_flavor, dict) \
            or not isinstance(pyfunc, dict) or pyfunc.get("loader_module") != "mlflow.pytorch" \
            or torch_flavor.get("model_data") != "data":
        loader = pyfunc.get("loader_module") if isinstance(pyfunc, dict) else None
        raise _refuse(uri, f"flavors {sorted(flavors)} (python_function loader {loader})")
    coded = [f"{name}.code" for name, flavor in flavors.items() if flavor.get("code")]
    if coded or any(n == "code" or n.startswith("code/") for n in names):
        raise _refuse(uri, f"it ships code ({', '.join(coded) or 'a code/ folder'})")
    pickled = sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise _refuse(uri, f"it holds pickle files ({', '.join(pickled[:3])})")
    if "data/model.pt2" not in names:
        raise _refuse(uri, "no data/model.pt2")
    meta = spec.get("metadata")
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(arch, dict) or f"extra_files/{WEIGHTS}" not in names:
        raise _refuse(uri, f"no architecture record or no extra_files/{WEIGHTS} (logged by an older imgclf: "
                           "run evaluate again)")
    _check_shape(uri, meta, arch)
    return meta


class _Folder:
    """A model folder on this machine: read in place, never copied."""

    def __init__(self, uri: str, root: Path, version: Optional[str] = None):
        self.uri, self.root, self.version = uri, root, version

    def names(self) -> set[str]:
        out: set[str] = set()
        for n, p in enumerate(self.root.rglob("*")):
            if n > MAX_MODEL_FILES:
                raise _refuse(self.uri, f"more than {MAX_MODEL_FILES} files")
            if p.is_file() or p.is_symlink():
                out.add(p.relative_to(self.root).as_posix())
        return out

    def fetch(self, name: str) -> Path:
        return self.root / name


class _Remote:
    """A model folder in an artifact store: listed, then only the files the loader reads are fetched."""

    def __init__(self, uri: str, tracking_uri: str, tmp: Path):
        self.uri, self.tmp = uri, tmp
        self.repo = artifact_repository(uri, tracking_uri)
        version = getattr(self.repo, "model_version", None)  # models:/ URIs: the version the alias names
        self.version = str(version) if version is not None else None

    def names(self) -> set[str]:
        out: set[str] = set()
        todo: list[Optional[str]] = [None]
        while todo:
            for info in self.repo.list_artifacts(todo.pop()):
                if len(out) + len(todo) > MAX_MODEL_FILES:
                    raise _refuse(self.uri, f"more than {MAX_MODEL_FILES} files")
                (todo.append(info.path) if info.is_dir else out.add(info.path))
        return out

    def fetch(self, name: str) -> Path:
        return Path(self.repo.download_artifacts(name, dst_path=str(self.tmp)))


def _local_folder(uri: str) -> Optional[Path]:
    if uri.startswith(("models:/", "runs:/")):
        return None
    import urllib.parse
    import urllib.request

    path = urllib.request.url2pathname(urllib.parse.urlparse(uri).path) if uri.startswith("file://") else uri
    return Path(path)


class LoadedModel:
    """A model of this project's format, read from `uri` without unpickling or importing anything from it:
    the module is rebuilt from the architecture record and filled with the safetensors weights."""

    def __init__(self, uri: str, tracking_uri: str):
        check_model_uri(uri)
        self.uri = uri
        local = _local_folder(uri)
        found = (local, None) if local is not None else embedded_model_folder(uri, tracking_uri)
        if found is not None:
            if not found[0].is_dir():
                raise LookupError(f"{uri}: no such model folder")
            self._load(_Folder(uri, *found))
            return
        from mlflow.exceptions import MlflowException

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr keeps to log lines
        # models:/ resolves through the process-wide registry URI whatever the arguments say (without the
        # scope: ./mlflow.db, created empty in the working directory).
        with tempfile.TemporaryDirectory(prefix="imgclf-model-") as tmp, scoped_tracking_uri(tracking_uri):
            try:
                self._load(_Remote(uri, tracking_uri, Path(tmp)))
            except (MlflowException, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                raise LookupError(f"{uri}: cannot load model ({message.strip().splitlines()[0][:200]})") from None

    def _load(self, folder: _Folder | _Remote) -> None:
        import yaml

        names = folder.names()
        if "MLmodel" not in names:
            raise ModelFormatError(f"{self.uri}: no MLmodel file; not an MLflow model")
        mlmodel = folder.fetch("MLmodel")
        if not mlmodel.is_file():  # a FIFO or device would block or never end
            raise _refuse(self.uri, "MLmodel is not a regular file")
        if mlmodel.stat().st_size > MAX_MLMODEL_BYTES:
            raise _refuse(self.uri, f"MLmodel larger than {MAX_MLMODEL_BYTES // 1024} KiB")
        try:
            spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{self.uri}: unreadable MLmodel ({type(exc).__name__})") from None
        meta = check_model_spec(self.uri, spec, names)
        weights = folder.fetch(f"extra_files/{WEIGHTS}")
        if not weights.is_file():
            raise _refuse(self.uri, f"extra_files/{WEIGHTS} is not a regular file")
        self.network = _rebuild(self.uri, meta["architecture"], weights)  # logits, as evaluate.evaluate takes
        self.module = Probabilities(self.network).eval()
        self.classes: list[str] = list(meta["classes"])
        self.in_shape: list[int] = list(meta["in_shape"])
        self.version: Optional[str] = folder.version  # the registry version that answered, for models:/ URIs

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


def _rebuild(uri: str, arch: dict[str, Any], weights: Path) -> nn.Module:
    """Our model from its architecture record and safetensors weights; anything that does not fit is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .config import ConfigError
    from .models.classifier import from_architecture

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
