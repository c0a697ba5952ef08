"""The settings that determine a result: data, model, training hyperparameters, evaluation, register policy.

These, and only these, make up the checkpoint identity, dvc.yaml's params, the Prefect cache key and
`params.digest`; changing anything in `runtime` or `paths` (environment.py) leaves them alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..schema import ConfigError, bounded, check_plain_name

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds both take it


Severity = Literal["error", "warn", "off"]  # a failed check stops prepare | is recorded and logged | is not run


@dataclass(frozen=True)
class DataChecksConfig:
    """What prepare checks before it writes a split (data/checks.py). Any failed check, even one set to warn,
    keeps the model trained on that data out of production (the gate)."""

    shape: Severity = "error"  # uint8 (N, C, H, W) of data.channels x data.image_size in every split
    values: Severity = "error"  # no blank (constant) images beyond max_blank_fraction; no split stored as 0..1
    labels: Severity = "error"  # labels within the source's class list, every class in every split
    balance: Severity = "error"  # per split: smallest class / largest class >= min_class_ratio
    duplicates: Severity = "error"  # no exact copy of an image (content hash) within a split or across splits
    min_class_ratio: float = bounded(0.02, ge=0.0, le=1.0)  # 50:1; EMNIST byclass, the most uneven source, is about 1:20
    max_blank_fraction: float = bounded(0.0, ge=0.0, le=1.0)


@dataclass(frozen=True)
class DataConfig:
    """Everything prepare's output depends on (with the raw data's content)."""

    source: str = "mnist"  # a name in datasource.DATA_SOURCES
    path: Optional[str] = None  # ImageFolder root (class-per-subfolder)
    classes: Optional[list[str]] = None  # ImageFolder label order (default: folder names sorted)
    image_size: int = bounded(28, ge=4, le=2048)
    channels: Literal[1, 3] = 1
    val_fraction: float = bounded(0.2, gt=0.0, lt=1.0)
    test_fraction: float = bounded(0.2, gt=0.0, lt=1.0)  # ImageFolder only; MNIST has t10k
    normalization: Literal["fixed", "fitted"] = "fixed"
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    # A quick run: at most this many images in each split (train, val, test), a seeded class-stratified draw
    # from the splits above; null: all. The sizes are in meta.json, the MLflow params and the model card.
    max_per_split: Optional[int] = bounded(None, ge=1)
    # Reviewed fixes (id,action,reason,who; action relabel:<class> or drop), applied by prepare to the drawn
    # splits; a missing file is no corrections (data/corrections.py).
    corrections: Optional[str] = "data/corrections.csv"
    checks: DataChecksConfig = field(default_factory=DataChecksConfig)

    def check(self, key: str) -> None:
        from ..data.datasource import DATA_SOURCES

        if self.source not in DATA_SOURCES:
            raise ConfigError(f"{key}.source: must be one of {', '.join(DATA_SOURCES)}; got {self.source!r}")
        if self.classes is not None and (len(set(self.classes)) != len(self.classes) or len(self.classes) < 2):
            raise ConfigError(f"{key}.classes: needs at least 2 distinct class names, got {self.classes!r}")
        DATA_SOURCES[self.source].check(self, key)  # what this kind of source adds (a path, a fixed size...)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters. After loading (resolve.py) none is None: a key left null is decided by the
    data source's recipe and then the model kind's TRAIN_DEFAULTS; a value written always wins."""

    optimizer: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: Optional[float] = bounded(None, gt=0.0)  # null: the model kind's (imgclf.models TRAIN_DEFAULTS)
    momentum: float = bounded(0.9, ge=0.0, lt=1.0)
    weight_decay: float = bounded(5e-4, ge=0.0)
    schedule: Literal["none", "onecycle", "cosine"] = "onecycle"
    label_smoothing: float = bounded(0.0, ge=0.0, lt=1.0)
    batch_size: int = bounded(128, ge=1, le=1 << 20)
    max_epochs: Optional[int] = bounded(None, ge=1, le=100_000)  # null: the kind's, else the data source's
    patience: int = bounded(4, ge=1, le=100_000)
    min_delta: float = bounded(0.0, ge=0.0)
    keep: Literal["last", "best_loss", "best_acc"] = "last"  # which epoch's weights training returns
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    augment_shift: Optional[int] = bounded(None, ge=0, le=16)  # random translation, in pixels
    augment_flip: Optional[bool] = None  # left-right mirroring: only where a mirrored image keeps its class


PERTURBATIONS = ("shift", "rotate", "noise", "invert", "flip")


@dataclass(frozen=True)
class Perturbation:
    """One behavioural test: the test split perturbed, scored again (evaluation/robustness.py)."""

    kind: Literal[PERTURBATIONS] = "shift"  # shift: pixels | rotate: degrees | noise: Gaussian std of [0, 1]
    size: float = bounded(1.0, ge=0.0, le=180.0)  # intensities | invert, flip: size unused (1)
    max_drop: Optional[float] = bounded(None, ge=0.0, le=1.0)  # accuracy lost at most; null: reported, not gated

    def check(self, key: str) -> None:
        if self.kind in ("shift", "rotate", "noise") and self.size <= 0:
            raise ConfigError(f"{key}.size: a {self.kind} needs a size > 0, got {self.size}")
        if self.kind == "shift" and self.size != int(self.size):
            raise ConfigError(f"{key}.size: a shift is a whole number of pixels, got {self.size}")
        if self.kind == "noise" and self.size > 1:
            raise ConfigError(f"{key}.size: noise is a std of intensities in [0, 1], got {self.size}")

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("invert", "flip") else f"{self.kind}_{self.size:g}"


@dataclass(frozen=True)
class EvaluateConfig:
    max_misclassified: int = bounded(36, ge=0, le=400)
    # null: by data source (resolve.py): shifts of 1 and 2 px, 10 degree rotations, noise, inverted contrast,
    # and a mirror test only where a mirrored image keeps its class (train.augment_flip)
    perturbations: Optional[list[Perturbation]] = None
    calibrate: bool = True  # fit a temperature on the validation split; predict and the served model apply it
    calibration_bins: int = bounded(15, ge=2, le=1000)
    low_confidence: float = bounded(0.5, ge=0.0, le=1.0)  # predict flags a top probability under this

    def check(self, key: str) -> None:
        names = [p.name for p in self.perturbations or []]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.perturbations: {sorted(n for n in names if names.count(n) > 1)[0]} twice")


@dataclass(frozen=True)
class ShadowGate:
    """What real traffic must say before a challenger takes production (imgclf serve --shadow records it)."""

    min_requests: int = bounded(0, ge=0)  # images scored by both against production; 0: not required
    min_agreement: float = bounded(0.0, ge=0.0, le=1.0)  # share of them where both gave the same class


@dataclass(frozen=True)
class LabelIssueGate:
    """The last `imgclf audit` of the same prepared data: its share of suspected label errors, in train +
    validation and in test, at most max_share. error: the gate requires it (an unaudited data set fails);
    warn: reported in the reason; off: not read."""

    severity: Literal["error", "warn", "off"] = "off"
    max_share: float = bounded(0.01, ge=0.0, le=1.0)


@dataclass(frozen=True)
class RegisterConfig:
    model_name: Optional[str] = None  # None: imgclf-<data.source> (imgclf-<folder name> for an ImageFolder)
    metric: Literal["accuracy", "macro_f1"] = "accuracy"  # what the gate compares, on the test split
    min_score: float = bounded(0.9, ge=0.0, le=1.0)  # of `metric`
    min_improvement: float = bounded(0.0, ge=0.0, le=1.0)  # over production's `metric`, same split, same scorer
    max_ece: float = bounded(0.05, ge=0.0, le=1.0)  # expected calibration error on test, as the model serves
    # Image by image against production (registry/paired.py), reported always; a null limit is not required.
    # 0.05: of 10 challengers of one recipe with other seeds (real MNIST, bench/gate_noise.py), 6 beat production
    # by 0.01 to 0.13 points and min_improvement 0 promoted them; at 0.05 (p 0.06 to 0.87) none.
    significance: Optional[float] = bounded(0.05, gt=0.0, lt=1.0)  # one-sided exact McNemar p-value at most this
    max_negative_flips: Optional[float] = bounded(None, ge=0.0, le=1.0)  # share production got right, it wrong
    max_class_drop: Optional[float] = bounded(None, ge=0.0, le=1.0)  # recall one class may lose
    # Gate decisions one test split may take before the reason warns that choices start to fit it (null: never).
    max_test_reuse: Optional[int] = bounded(20, ge=1)
    shadow: ShadowGate = field(default_factory=ShadowGate)
    label_issues: LabelIssueGate = field(default_factory=LabelIssueGate)

    def check(self, key: str) -> None:
        check_plain_name(self.model_name, f"{key}.model_name")
