"""Whether a model is this project's own, safe format: its URI, its MLmodel spec and shapes, the folder it
is read from (local in place, or only two files fetched from an artifact store) and its rebuild from the
architecture record and safetensors weights. Nothing here unpickles or imports anything a model holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..tracking.mlflow_internals import artifact_repository

# Suffixes of files MLflow flavors unpickle; none belongs in a model this project logged.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pth", ".joblib", ".cloudpickle", ".dill")
MIN_SIDE, MAX_SIDE, MAX_CLASSES = 4, 2048, 100_000  # data.image_size's bounds
MAX_MODEL_FILES, MAX_MLMODEL_BYTES = 10_000, 1 << 20
WEIGHTS = "weights.safetensors"  # beside the pt2 graph, in the MLflow model's extra_files/
_MODEL_URI = re.compile(r"models:/[^/@\s]+(@[\w.-]+|/\d+)|runs:/[0-9a-f]{32}/[^\s]+|file://\S+|[^:\s][^:]*")


class ModelFormatError(LookupError):
    """A model URI that does not hold a model of this project's own (safe) format."""


def check_model_uri(uri: Any) -> str:
    if not isinstance(uri, str) or not _MODEL_URI.fullmatch(uri) or "\x00" in uri:
        raise ModelFormatError(f"{uri!r}: not a model URI (expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                               "runs:/RUN_ID/PATH or a local model folder)")
    return uri


def refuse(uri: str, why: str) -> ModelFormatError:
    return ModelFormatError(f"{uri}: {why}; refused: only imgclf's own models (architecture record + safetensors "
                            "weights) are loaded")


def _check_shape(uri: str, meta: dict[str, Any], arch: dict[str, Any]) -> None:
    """Shapes and class lists bounded and consistent before anything is allocated from them."""
    in_shape, classes = meta.get("in_shape"), meta.get("classes")
    if not (isinstance(in_shape, list) and len(in_shape) == 3 and all(type(v) is int for v in in_shape)
            and in_shape[0] in (1, 3) and all(MIN_SIDE <= v <= MAX_SIDE for v in in_shape[1:])):
        raise refuse(uri, f"metadata in_shape {str(in_shape)[:80]} is not [1 or 3, {MIN_SIDE}..{MAX_SIDE}, "
                           f"{MIN_SIDE}..{MAX_SIDE}]")
    if not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES and all(isinstance(c, str) for c in classes)):
        raise refuse(uri, f"metadata classes must be 2..{MAX_CLASSES} names")
    if arch.get("in_shape") != in_shape or arch.get("classes") != classes or arch.get("n_classes") != len(classes):
        raise refuse(uri, "metadata in_shape/classes differ from its architecture record")


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
        raise refuse(uri, f"flavors {sorted(flavors)} (python_function loader {loader})")
    coded = [f"{name}.code" for name, flavor in flavors.items() if flavor.get("code")]
    if coded or any(n == "code" or n.startswith("code/") for n in names):
        raise refuse(uri, f"it ships code ({', '.join(coded) or 'a code/ folder'})")
    pickled = sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise refuse(uri, f"it holds pickle files ({', '.join(pickled[:3])})")
    if "data/model.pt2" not in names:
        raise refuse(uri, "no data/model.pt2")
    meta = spec.get("metadata")
    arch = meta.get("architecture") if isinstance(meta, dict) else None
    if not isinstance(arch, dict) or f"extra_files/{WEIGHTS}" not in names:
        raise refuse(uri, f"no architecture record or no extra_files/{WEIGHTS} (logged by an older imgclf: "
                           "run evaluate again)")
    _check_shape(uri, meta, arch)
    return meta


class LocalFolder:
    """A model folder on this machine: read in place, never copied."""

    def __init__(self, uri: str, root: Path, version: Optional[str] = None):
        self.uri, self.root, self.version = uri, root, version

    def names(self) -> set[str]:
        out: set[str] = set()
        for n, p in enumerate(self.root.rglob("*")):
            if n > MAX_MODEL_FILES:
                raise refuse(self.uri, f"more than {MAX_MODEL_FILES} files")
            if p.is_file() or p.is_symlink():
                out.add(p.relative_to(self.root).as_posix())
        return out

    def fetch(self, name: str) -> Path:
        return self.root / name


class RemoteFolder:
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
                    raise refuse(self.uri, f"more than {MAX_MODEL_FILES} files")
                (todo.append(info.path) if info.is_dir else out.add(info.path))
        return out

    def fetch(self, name: str) -> Path:
        return Path(self.repo.download_artifacts(name, dst_path=str(self.tmp)))


def local_folder(uri: str) -> Optional[Path]:
    if uri.startswith(("models:/", "runs:/")):
        return None
    import urllib.parse
    import urllib.request

    path = urllib.request.url2pathname(urllib.parse.urlparse(uri).path) if uri.startswith("file://") else uri
    return Path(path)


def rebuild(uri: str, arch: dict[str, Any], weights: Path) -> nn.Module:
    """Our model from its architecture record and safetensors weights; anything that does not fit is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..config import ConfigError
    from ..models.classifier import from_architecture

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
