"""Typed, validated configuration loaded once from params.yaml.

Plain dataclasses (no pydantic) so the training code runs on a machine that has
only torch, torchvision and numpy. Every rejection is a ConfigError whose message
names the dotted key and the offending value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

TORCHVISION_MNIST_MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


def _c(default=dataclasses.MISSING, *, factory=None, **bounds):
    """A field with numeric bounds (gt, ge, lt, le) or min_len, checked on load."""
    if factory is not None:
        return field(default_factory=factory, metadata=bounds)
    return field(default=default, metadata=bounds)


@dataclass(frozen=True)
class DataConfig:
    source: Literal["mnist", "imagefolder"] = "mnist"
    path: Optional[str] = None  # ImageFolder root (class-per-subfolder)
    mirrors: list[str] = _c(factory=lambda: list(TORCHVISION_MNIST_MIRRORS), min_len=1)
    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    image_size: int = _c(28, ge=4, le=2048)
    channels: Literal[1, 3] = 1
    val_fraction: float = _c(0.2, gt=0.0, lt=1.0)
    test_fraction: float = _c(0.2, gt=0.0, lt=1.0)  # ImageFolder only; MNIST has t10k
    normalization: Literal["fixed", "fitted"] = "fixed"
    seed: int = 0
    download_retries: int = _c(3, ge=1, le=20)
    download_timeout_s: float = _c(30.0, gt=0.0)
    download_backoff_s: float = _c(1.0, ge=0.0)
    dvc_file: Optional[str] = "data.dvc"  # raw data is `dvc add`ed here and pushed after download; null: off

    def check(self, key: str) -> None:
        if self.source == "imagefolder" and not self.path:
            raise ConfigError(f"{key}.path: required when {key}.source is imagefolder")
        if self.source == "mnist" and (self.image_size, self.channels) != (28, 1):
            raise ConfigError(
                f"{key}.image_size/{key}.channels: MNIST is 28x28 grey, got "
                f"{self.image_size}x{self.image_size} with {self.channels} channel(s)"
            )
        if self.source == "imagefolder" and self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"{key}.test_fraction: test_fraction + val_fraction must be < 1, got "
                f"{self.test_fraction} + {self.val_fraction}"
            )


@dataclass(frozen=True)
class MLPConfig:
    hidden: list[int] = _c(factory=lambda: [512, 256], min_len=1)
    dropout: float = _c(0.1, ge=0.0, lt=1.0)
    # train.* defaults for this model kind (explicit --set train.* still wins)
    train: dict = field(default_factory=lambda: {"lr": 0.001, "augment_shift": 1, "max_epochs": 24})

    def check(self, key: str) -> None:
        _positive_items(self.hidden, f"{key}.hidden")


@dataclass(frozen=True)
class CNNConfig:
    channels: list[int] = _c(factory=lambda: [16, 32, 64], min_len=1)
    convs_per_block: int = _c(2, ge=1, le=8)
    kernel_size: int = _c(3, ge=1, le=11)
    batch_norm: bool = True
    head_hidden: list[int] = _c(factory=lambda: [128])
    dropout: float = _c(0.25, ge=0.0, lt=1.0)
    train: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        _positive_items(self.channels, f"{key}.channels")
        _positive_items(self.head_hidden, f"{key}.head_hidden")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"{key}.kernel_size: must be odd so padding keeps the size, got {self.kernel_size}")


@dataclass(frozen=True)
class ModelConfig:
    kind: Literal["mlp", "cnn"] = "cnn"
    mlp: MLPConfig = field(default_factory=MLPConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)


@dataclass(frozen=True)
class TrainConfig:
    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = _c(4e-3, gt=0.0)
    momentum: float = _c(0.9, ge=0.0, lt=1.0)
    weight_decay: float = _c(5e-4, ge=0.0)
    schedule: Literal["none", "onecycle", "cosine"] = "onecycle"
    label_smoothing: float = _c(0.0, ge=0.0, lt=1.0)
    batch_size: int = _c(128, ge=1)
    max_epochs: int = _c(12, ge=1)
    patience: int = _c(4, ge=1)
    min_delta: float = _c(0.0, ge=0.0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = _c(0, ge=0)  # 0: the cores this process may really use
    augment_shift: int = _c(2, ge=0, le=16)  # random translation, in pixels, train split only
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = _c(4.0, gt=0.0)  # "auto" streams splits larger than this
    out_dir: str = "models"
    metrics_dir: str = "metrics"


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = _c(1000, ge=1)
    out_dir: str = "reports"
    max_misclassified: int = _c(36, ge=0, le=400)


@dataclass(frozen=True)
class RegisterConfig:
    model_name: str = "imgclf-mnist"
    min_accuracy: float = _c(0.9, ge=0.0, le=1.0)
    min_improvement: float = _c(0.0, ge=0.0, le=1.0)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else the embedded store below
    store_dir: str = "mlflow"
    experiment: str = "imgclf"


@dataclass(frozen=True)
class OrchestrationConfig:
    train_pool: Optional[str] = None
    train_timeout_s: Optional[float] = _c(None, gt=0.0)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys, the spelling `--set` and MLflow params use."""
        out: dict[str, Any] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[prefix + k] = v

        walk(self.to_dict(), "")
        return out

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _positive_items(values: list[int], key: str) -> None:
    for v in values:
        if v <= 0:
            raise ConfigError(f"{key}: every entry must be > 0, got {values}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a field type this loader was not taught
        raise TypeError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


_BOUNDS = {
    "gt": (lambda v, b: v > b, ">"),
    "ge": (lambda v, b: v >= b, ">="),
    "lt": (lambda v, b: v < b, "<"),
    "le": (lambda v, b: v <= b, "<="),
}


def build(cls: type, raw: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and bad values."""
    where = key or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            full = f"{key}.{k}" if key else str(k)
            raise ConfigError(f"{full}: unknown key (allowed under {where}: {', '.join(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        full = f"{key}.{f.name}" if key else f.name
        value = _coerce(hints[f.name], raw[f.name], full)
        for bound, (ok, sym) in _BOUNDS.items():
            if bound in f.metadata and value is not None and not ok(value, f.metadata[bound]):
                raise ConfigError(f"{full}: must be {sym} {f.metadata[bound]}, got {value!r}")
        if "min_len" in f.metadata and len(value) < f.metadata["min_len"]:
            raise ConfigError(f"{full}: needs at least {f.metadata['min_len']} item(s), got {value!r}")
        kwargs[f.name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` with a YAML scalar value, as `dvc exp run -S` spells it."""
    import yaml

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected key.sub=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {value!r}: {exc}") from None
    if isinstance(parsed, str) and _FLOAT_RE.fullmatch(parsed.strip()):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string; users mean a number
    return key, parsed


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown paths are caught by `build`."""
    out = json.loads(json.dumps(raw))
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: {part} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def from_dict(raw: dict, overrides: dict[str, Any] | None = None) -> Config:
    """Validate params; `model.<kind>.train` sits between params' train section and explicit overrides."""
    overrides = overrides or {}
    merged = apply_overrides(raw or {}, overrides)
    model = merged.get("model")
    kind = model.get("kind", ModelConfig.kind) if isinstance(model, dict) else ModelConfig.kind
    section = model.get(kind) if isinstance(model, dict) and isinstance(kind, str) else None
    if section is None:
        section = {"train": getattr(ModelConfig(), kind).train} if kind in ("mlp", "cnn") else {}
    per_kind = section.get("train", getattr(getattr(ModelConfig(), kind, None), "train", {})) \
        if isinstance(section, dict) else {}
    if per_kind:
        if not isinstance(per_kind, dict):
            raise ConfigError(f"model.{kind}.train: expected a mapping, got {per_kind!r}")
        build(TrainConfig, per_kind, f"model.{kind}.train")  # names the right key on a bad entry
        explicit = {k: v for k, v in overrides.items() if k.startswith("train.")}
        base = apply_overrides(raw or {}, {k: v for k, v in overrides.items() if not k.startswith("train.")})
        base["train"] = {**(base.get("train") or {}), **per_kind}
        merged = apply_overrides(base, explicit)
    return build(Config, merged)


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a params file once, apply overrides, validate everything."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    try:
        return from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
