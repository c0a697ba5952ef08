"""Where every stage's files live, named once and built from the config.

Stages, DVC (dvc.yaml lists the same paths) and the remote-training hand-off all
go through this object, so a file name is spelled in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .data import META_FILE, split_file  # noqa: F401  (named with the data; re-exported)


@dataclass(frozen=True)
class Layout:
    raw_root: Path
    processed: Path
    models: Path
    metrics: Path
    reports: Path
    audit: Path  # imgclf audit's tables and pictures

    @classmethod
    def of(cls, cfg: Config) -> "Layout":
        return cls(Path(cfg.paths.raw_dir), Path(cfg.paths.processed_dir), Path(cfg.paths.models_dir),
                   Path(cfg.paths.metrics_dir), Path(cfg.paths.reports_dir), Path(cfg.paths.audit_dir))

    # prepare
    @property
    def meta(self) -> Path:
        return self.processed / META_FILE

    def split(self, name: str) -> Path:
        return self.processed / split_file(name)

    # train
    @property
    def best(self) -> Path:
        return self.models / "best.pt"

    @property
    def checkpoint(self) -> Path:
        return self.models / "checkpoint.pt"

    @property
    def run_ref(self) -> Path:
        return self.models / "run.json"

    @property
    def train_summary(self) -> Path:
        return self.metrics / "train.json"

    @property
    def train_scores(self) -> Path:  # what `dvc metrics show` compares; the rest stays in train_summary
        return self.metrics / "train_scores.json"

    @property
    def train_history(self) -> Path:
        return self.metrics / "train_history.csv"

    # evaluate
    @property
    def torchscript(self) -> Path:
        return self.models / "model.pt"

    @property
    def logged_model(self) -> Path:  # a file of its own: rewriting run.json would make DVC rerun train
        return self.models / "logged_model.json"

    @property
    def test_summary(self) -> Path:
        return self.metrics / "test.json"

    @property
    def test_scores(self) -> Path:
        return self.metrics / "test_scores.json"

    # register
    @property
    def registered(self) -> Path:
        return self.models / "registered.json"

    @property
    def gate(self) -> Path:  # the images the challenger fixes and breaks against production: flips.csv, flips.png
        return self.models / "gate"

    def writes(self, stage: str) -> list[Path]:
        """The folders a stage writes into: it holds them exclusively while it runs."""
        return {"download": [self.raw_root], "prepare": [self.processed], "train": [self.models, self.metrics],
                "evaluate": [self.models, self.metrics, self.reports], "register": [self.models],
                "sync": [self.models], "audit": [self.audit]}[stage]

    def train_outputs(self) -> list[Path]:
        """What a remote training worker sends back: weights, the run reference and the metrics."""
        return [self.best, self.run_ref, self.train_summary, self.train_scores, self.train_history]


def kept_by_the_checkout(path: str | Path, cwd: Path | None = None) -> Path:
    """An absolute path for a folder the checkout keeps for itself (the embedded tracking store and, beside it,
    the sweep's study): in a DVC temporary workspace (`<repo>/.dvc/tmp/exps/<tmp>/`, where `dvc exp run --temp`
    and `dvc queue start` run the stages) a relative path means the repository's own, not a copy deleted with
    that workspace along with every run, model and registry decision tracked into it."""
    path = Path(path)
    if path.is_absolute():
        return path
    here = (cwd or Path.cwd()).resolve()
    for parent in here.parents:
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return (parent.parent.parent.parent / path).resolve()
    return (here / path).resolve()
