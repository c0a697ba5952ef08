"""The whole configuration: result sections (experiment.py) beside `runtime` and `paths` (environment.py).

Plain dataclasses (no pydantic) so the training code runs on a machine that has only torch,
torchvision and numpy. Model kinds bring their own params classes (imgclf.models).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..audit.settings import AuditConfig
from ..data.datasource import data_source
from ..models import KINDS
from ..monitoring.settings import MonitorConfig
from ..schema import ConfigError
from ..serve.settings import ServeConfig
from ..sweep.settings import SweepConfig
from .environment import PathsConfig, RuntimeConfig, Tracking
from .experiment import DataConfig, EvaluateConfig, RegisterConfig, TrainConfig

# The sections that determine a result; the rest (runtime, paths) only say where and how fast.
RESULT_SECTIONS = ("data", "model", "train", "evaluate", "register")


def _model_config() -> type:
    """`model`: the kind, and one section per registered kind (every one validated, the active one used)."""
    fields = [("kind", Literal[tuple(KINDS)], field(default="cnn"))]
    fields += [(name, k.params, field(default_factory=k.params)) for name, k in KINDS.items()]
    return dataclasses.make_dataclass("ModelConfig", fields, frozen=True,
                                      namespace={"active": property(lambda self: getattr(self, self.kind))})


ModelConfig = _model_config()


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def check(self, key: str) -> None:
        """Folders that a stage replaces whole (paths.raw_dir's snapshot, paths.processed_dir) may neither hold
        nor sit inside another configured folder, nor be the working directory: a swap would delete it."""
        if self.runtime.link != "auto" and not data_source(self.data.source).takes_link:
            raise ConfigError(f"runtime.link: only for imagefolder; {self.data.source} would ignore it")
        paths = {f"paths.{k}": v for k, v in dataclasses.asdict(self.paths).items() if k != "dvc_file"}
        resolved = {k: Path(v).resolve() for k, v in paths.items()}
        here = Path.cwd().resolve()
        for k in ("paths.processed_dir", "paths.raw_dir"):
            mine = resolved[k]
            if mine == here or mine in here.parents:
                raise ConfigError(f"{k}: {paths[k]!r} is the working directory or above it; a stage replaces this folder")
            for other, theirs in resolved.items():
                if other != k and (mine == theirs or mine in theirs.parents or theirs in mine.parents):
                    raise ConfigError(f"{k}: {paths[k]!r} overlaps {other} ({paths[other]!r}); a stage replaces "
                                      "this folder, so it must hold nothing else")
        self._check_inbox(resolved, here)

    def _check_inbox(self, paths: dict[str, Path], here: Path) -> None:
        """monitor.inbox: the batch-inference flow moves every scored file out of it, so it must be a folder of
        its own: not the checkout or above it, not the home folder or above it, none of the configured folders,
        no project (a git or DVC repository) of its own."""
        inbox, written = Path(self.monitor.inbox).resolve(), self.monitor.inbox
        why = "the batch-inference flow moves every file it scores out of it; give it a folder of its own"
        for guarded, what in ((here, "the working directory"), (Path.home().resolve(), "the home folder")):
            if inbox == guarded or inbox in guarded.parents:
                raise ConfigError(f"monitor.inbox: {written!r} is {what} or above it; {why}")
        for other, theirs in paths.items():
            if inbox == theirs or inbox in theirs.parents or theirs in inbox.parents:
                raise ConfigError(f"monitor.inbox: {written!r} overlaps {other}; {why}")
        for marker in (".git", ".dvc", "dvc.yaml", "params.yaml"):
            if (inbox / marker).exists():
                raise ConfigError(f"monitor.inbox: {written!r} holds a project ({marker}); {why}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The sections that determine the result, with the model section narrowed to the active kind
        (the other kinds' settings cannot change this run) and its train defaults already folded in."""
        out = {k: dataclasses.asdict(getattr(self, k)) for k in RESULT_SECTIONS}
        active = {k: v for k, v in out["model"][self.model.kind].items() if k != "train"}
        out["model"] = {"kind": self.model.kind, self.model.kind: active}
        return out

    def flat(self) -> dict[str, Any]:
        """The result settings as dotted keys, the spelling `--set` and MLflow params use."""
        out: dict[str, Any] = {}

        def walk(d: dict, prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[prefix + k] = v

        walk(self.result_dict(), "")
        return out

    def digest(self) -> str:
        """Of the result settings only: a runtime or path change keeps it."""
        return hashlib.sha256(json.dumps(self.result_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tracking(self) -> Tracking:
        t = self.runtime.tracking
        return Tracking(t.enabled, t.uri, t.experiment, self.paths.mlflow_dir)

    @property
    def model_name(self) -> str:
        """The registered model's name: register.model_name, else one per data source."""
        return self.register.model_name or data_source(self.data.source).default_model_name(self.data)

    @property
    def mirrors(self) -> list[str]:
        return list(self.runtime.download.mirrors or data_source(self.data.source).mirrors)

    def prepare_inputs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.data)
