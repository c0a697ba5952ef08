"""Typed, validated configuration loaded once from params.yaml.

Plain dataclasses (no pydantic) so the training code runs on a machine that has
only torch, torchvision and numpy. Parsing lives in params_file, validation in schema.
Over 200 lines because every section's schema (types, bounds, cross-field checks) is
kept in this one place, where a reader looks for what a key means.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from .params_file import parse_override, read_params
from .schema import ConfigError, bounded, build, positive_items

__all__ = ["Config", "ConfigError", "apply_overrides", "from_dict", "load", "parse_override", "PREPARE_KEYS"]

# Spelled out for the schema; sources.SOURCE_NAMES is the same list (a test holds them equal).
SourceName = Literal["mnist", "fashion-mnist", "kmnist", "qmnist", "emnist-byclass", "emnist-bymerge",
                     "emnist-balanced", "emnist-letters", "emnist-digits", "emnist-mnist", "imagefolder"]

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it
MAX_WIDTH = 65536  # units of one layer: wider is a typo (or an attempt to exhaust memory), not a model

# The data params the prepare stage's output depends on: dvc.yaml's prepare params, the Prefect cache
# key and meta.json all use this list (a test holds dvc.yaml to it), so mirrors or download timeouts
# never invalidate prepared data.
PREPARE_KEYS = ("source", "path", "classes", "raw_dir", "processed_dir", "image_size", "channels", "val_fraction",
                "test_fraction", "normalization", "seed")


@dataclass(frozen=True)
class DataConfig:
    source: SourceName = "mnist"
    path: Optional[str] = None  # ImageFolder root (class-per-subfolder)
    classes: Optional[list[str]] = None  # ImageFolder label order (default: folder names sorted)
    link: Literal["auto", "copy", "hardlink"] = "auto"  # how an ImageFolder snapshot gets new files
    mirrors: Optional[list[str]] = bounded(None, min_len=1)  # None: the source's official mirrors
    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    image_size: int = bounded(28, ge=4, le=2048)
    channels: Literal[1, 3] = 1
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    test_fraction: float = bounded(0.2, gt=0.0, lt=1.0)  # ImageFolder only; MNIST has t10k
    normalization: Literal["fixed", "fitted"] = "fixed"
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    download_retries: int = bounded(3, ge=1, le=20)
    download_timeout_s: float = bounded(30.0, gt=0.0, le=3600.0)  # one read may wait this long
    download_deadline_s: Optional[float] = bounded(None, gt=0.0)  # opt-in: one file from one mirror, in all
    download_speed_limit_bps: float = bounded(1024.0, ge=0.0)  # slower than this ...
    download_speed_time_s: float = bounded(30.0, gt=0.0, le=3600.0)  # ... for this long: the next mirror
    download_backoff_s: float = bounded(1.0, ge=0.0, le=600.0)
    dvc_file: Optional[str] = "data.dvc"  # raw data is `dvc add`ed here and pushed after download; null: off

    def check(self, key: str) -> None:
        if self.source == "imagefolder" and not self.path:
            raise ConfigError(f"{key}.path: required when {key}.source is imagefolder")
        if self.source != "imagefolder" and (self.image_size, self.channels) != (28, 1):
            raise ConfigError(
                f"{key}.image_size/{key}.channels: {self.source} is 28x28 grey, got "
                f"{self.image_size}x{self.image_size} with {self.channels} channel(s)"
            )
        if self.classes is not None and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise ConfigError(f"{key}.classes: needs at least 2 distinct class names, got {self.classes!r}")
        if self.classes is not None and self.source != "imagefolder":
            raise ConfigError(f"{key}.classes: only for imagefolder ({self.source} has its official class order)")
        if self.path is not None and self.source != "imagefolder":
            raise ConfigError(f"{key}.path: only for imagefolder; {key}.source is {self.source}, which would ignore "
                              f"it (set {key}.source: imagefolder to train on that folder)")
        if self.link != "auto" and self.source != "imagefolder":
            raise ConfigError(f"{key}.link: only for imagefolder; {self.source} would ignore it")
        if self.source == "imagefolder" and self.val_fraction + self.test_fraction >= 1:
            raise ConfigError(
                f"{key}.test_fraction: test_fraction + val_fraction must be < 1, got "
                f"{self.test_fraction} + {self.val_fraction}"
            )


@dataclass(frozen=True)
class MLPConfig:
    hidden: list[int] = bounded(factory=lambda: [512, 256], min_len=1)
    dropout: float = bounded(0.1, ge=0.0, lt=1.0)
    # train.* defaults for this model kind (explicit --set train.* still wins)
    train: dict = field(default_factory=lambda: {"lr": 0.001, "augment_shift": 1, "max_epochs": 24})

    def check(self, key: str) -> None:
        positive_items(self.hidden, f"{key}.hidden", MAX_WIDTH)
        build(TrainConfig, self.train, f"{key}.train")  # checked whichever kind is active


@dataclass(frozen=True)
class CNNConfig:
    channels: list[int] = bounded(factory=lambda: [16, 32, 64], min_len=1)
    convs_per_block: int = bounded(2, ge=1, le=8)
    kernel_size: int = bounded(3, ge=1, le=11)
    batch_norm: bool = True
    head_hidden: list[int] = bounded(factory=lambda: [128])
    dropout: float = bounded(0.25, ge=0.0, lt=1.0)
    train: dict = field(default_factory=dict)

    def check(self, key: str) -> None:
        positive_items(self.channels, f"{key}.channels", MAX_WIDTH)
        positive_items(self.head_hidden, f"{key}.head_hidden", MAX_WIDTH)
        build(TrainConfig, self.train, f"{key}.train")
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
    lr: float = bounded(4e-3, gt=0.0)
    momentum: float = bounded(0.9, ge=0.0, lt=1.0)
    weight_decay: float = bounded(5e-4, ge=0.0)
    schedule: Literal["none", "onecycle", "cosine"] = "onecycle"
    label_smoothing: float = bounded(0.0, ge=0.0, lt=1.0)
    batch_size: int = bounded(128, ge=1, le=1 << 20)
    max_epochs: Optional[int] = bounded(None, ge=1, le=100_000)  # None: the data source's (12; fashion-mnist 16)
    patience: int = bounded(4, ge=1, le=100_000)
    min_delta: float = bounded(0.0, ge=0.0)
    keep: Literal["last", "best_loss", "best_acc"] = "last"  # which epoch's weights training returns
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = bounded(0, ge=0, le=4096)  # 0: the cores this process may really use
    # Augmentation of the train split; None: what suits the data source (sources.Recipe).
    augment_shift: Optional[int] = bounded(None, ge=0, le=16)  # random translation, in pixels
    augment_flip: Optional[bool] = None  # left-right mirroring: only where a mirrored image keeps its class
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = bounded(4.0, gt=0.0)  # "auto" streams splits larger than this
    out_dir: str = "models"
    metrics_dir: str = "metrics"


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = bounded(1000, ge=1)
    out_dir: str = "reports"
    max_misclassified: int = bounded(36, ge=0, le=400)


@dataclass(frozen=True)
class RegisterConfig:
    model_name: Optional[str] = None  # None: imgclf-<data.source> (imgclf-<folder name> for an ImageFolder)
    min_accuracy: float = bounded(0.9, ge=0.0, le=1.0)
    min_improvement: float = bounded(0.0, ge=0.0, le=1.0)

    def check(self, key: str) -> None:
        # Quotes would break MLflow's search filters after the model was created (left empty behind), and
        # slashes or '@' would make models:/ URIs ambiguous.
        if self.model_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.model_name):
            raise ConfigError(f"{key}.model_name: letters, digits, '.', '_' and '-' only (at most 128, starting "
                              f"with a letter or digit), got {self.model_name[:80]!r}")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else the embedded store below
    store_dir: str = "mlflow"
    experiment: str = "imgclf"


@dataclass(frozen=True)
class OrchestrationConfig:
    train_pool: Optional[str] = None
    train_timeout_s: Optional[float] = bounded(None, gt=0.0)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)

    def check(self, key: str) -> None:
        """Folders that a stage replaces whole (data.raw_dir's snapshot, data.processed_dir) may neither hold
        nor sit inside another configured folder, nor be the working directory: a swap would delete it."""
        paths = {"data.raw_dir": self.data.raw_dir, "data.processed_dir": self.data.processed_dir,
                 "train.out_dir": self.train.out_dir, "train.metrics_dir": self.train.metrics_dir,
                 "evaluate.out_dir": self.evaluate.out_dir, "tracking.store_dir": self.tracking.store_dir}
        resolved = {k: Path(v).resolve() for k, v in paths.items()}
        here = Path.cwd().resolve()
        for k in ("data.processed_dir", "data.raw_dir"):
            mine = resolved[k]
            if mine == here or mine in here.parents:
                raise ConfigError(f"{k}: {paths[k]!r} is the working directory or above it; a stage replaces this folder")
            for other, theirs in resolved.items():
                if other != k and (mine == theirs or mine in theirs.parents or theirs in mine.parents):
                    raise ConfigError(f"{k}: {paths[k]!r} overlaps {other} ({paths[other]!r}); a stage replaces "
                                      "this folder, so it must hold nothing else")

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

    def training(self) -> TrainConfig:
        """train.* with the keys left null decided by the data source (sources.Recipe)."""
        from .sources import DEFAULT_RECIPE, SOURCES

        recipe = SOURCES[self.data.source].recipe if self.data.source in SOURCES else DEFAULT_RECIPE
        t = self.train
        return dataclasses.replace(
            t, augment_shift=recipe.shift if t.augment_shift is None else t.augment_shift,
            augment_flip=recipe.flip if t.augment_flip is None else t.augment_flip,
            max_epochs=recipe.epochs if t.max_epochs is None else t.max_epochs)

    def kind_train_defaults(self) -> dict[str, Any]:
        """The active model kind's train.* defaults (model.<kind>.train), applied under explicit --set train.*."""
        return dict(getattr(self.model, self.model.kind).train)

    @property
    def model_name(self) -> str:
        """The registered model's name: register.model_name, else one per data source."""
        if self.register.model_name:
            return self.register.model_name
        if self.data.source == "imagefolder":
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(self.data.path or "images").resolve().name).strip("-")
            return f"imgclf-{slug or 'images'}"
        return f"imgclf-{self.data.source}"

    @property
    def mirrors(self) -> list[str]:
        from .sources import idx_source

        return list(self.data.mirrors or idx_source(self.data.source).mirrors)

    def prepare_inputs(self) -> dict[str, Any]:
        return {k: getattr(self.data, k) for k in PREPARE_KEYS}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (a copy); unknown paths are caught by `build`."""
    out = copy.deepcopy(raw)
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
    cfg = build(Config, apply_overrides(raw or {}, overrides))
    per_kind = getattr(cfg.model, cfg.model.kind).train
    if not per_kind:
        return cfg
    explicit = {k: v for k, v in overrides.items() if k.startswith("train.")}
    base = apply_overrides(raw or {}, {k: v for k, v in overrides.items() if not k.startswith("train.")})
    base["train"] = {**(base.get("train") or {}), **per_kind}
    return build(Config, apply_overrides(base, explicit))


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Read a params file once, apply overrides, validate everything."""
    raw = read_params(path)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    try:
        return from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
