"""Settings that change where and how fast a stage runs, never its result: `runtime` and `paths`.

Kept apart from experiment.py so that resuming with another thread count, moving a folder or pointing
at another mirror neither invalidates a checkpoint nor makes `dvc repro` retrain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ..schema import bounded


@dataclass(frozen=True)
class DownloadConfig:
    mirrors: Optional[list[str]] = bounded(None, min_len=1)  # None: the source's official mirrors
    retries: int = bounded(3, ge=1, le=20)
    timeout_s: float = bounded(30.0, gt=0.0, le=3600.0)  # one read may wait this long
    deadline_s: Optional[float] = bounded(None, gt=0.0)  # opt-in: one file from one mirror, in all
    speed_limit_bps: float = bounded(1024.0, ge=0.0)  # slower than this ...
    speed_time_s: float = bounded(30.0, gt=0.0, le=3600.0)  # ... for this long: the next mirror
    backoff_s: float = bounded(1.0, ge=0.0, le=600.0)


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else the embedded store in paths.mlflow_dir
    experiment: str = "imgclf"
    # The Optuna study of `imgclf sweep`. None: $IMGCLF_STUDY_STORAGE, else optuna.db beside the embedded mlflow.db
    study_storage: Optional[str] = None


@dataclass(frozen=True)
class OrchestrationConfig:
    train_pool: Optional[str] = None
    train_timeout_s: Optional[float] = bounded(None, gt=0.0)
    # A train flow run that crashed or whose worker went silent is submitted again, this many times; each new
    # attempt resumes from the last epoch checkpoint in the MLflow run's artifacts, in the same run.
    train_retries: int = bounded(2, ge=0, le=100)
    # Silent: no Prefect flow-run heartbeat for this long, and for at least two of the run's intervals and 15 s
    # (`imgclf worker` beats every 30 s; Prefect's default is 180). A run that never beat is never judged lost.
    train_lost_after_s: float = bounded(90.0, gt=30.0)


@dataclass(frozen=True)
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = bounded(0, ge=0, le=4096)  # 0: the cores this process may really use
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_gb: float = bounded(4.0, gt=0.0)  # "auto" streams splits larger than this
    eval_batch_size: int = bounded(1000, ge=1, le=1 << 20)
    link: Literal["auto", "copy", "hardlink"] = "auto"  # how an ImageFolder snapshot gets new files
    download: DownloadConfig = field(default_factory=DownloadConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = field(default_factory=OrchestrationConfig)


@dataclass(frozen=True)
class PathsConfig:
    raw_dir: str = "data/raw"
    processed_dir: str = "data/processed"
    models_dir: str = "models"
    metrics_dir: str = "metrics"
    reports_dir: str = "reports"
    audit_dir: str = "data/audit"  # imgclf audit's tables and pictures (reports/ is evaluate's, replaced whole)
    mlflow_dir: str = "mlflow"  # the embedded tracking store (mlflow.db, artifacts/)
    dvc_file: Optional[str] = "data.dvc"  # raw data is `dvc add`ed here and pushed after download; null: off


@dataclass(frozen=True)
class Tracking:
    """runtime.tracking with the embedded store's folder: what the tracking code needs, in one value."""

    enabled: bool
    uri: Optional[str]
    experiment: str
    store_dir: str
