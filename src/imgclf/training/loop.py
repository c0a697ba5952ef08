"""One training loop for every model: validation each epoch, early stopping, atomic resumable checkpoints.

Needs only torch (and the library's own modules), so it runs on a GPU worker that has nothing else
installed. `fit` reads as the recipe; one epoch's steps are in epoch.py, save and resume in checkpoint.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config import TrainConfig
from ..data.batches import Batches
from .checkpoint import Checkpointing
from .epoch import Hooks, NonFiniteLoss, Step, TrainTimeout, cpu_state, evaluate_batches, run_epoch
from .runtime import DistInfo

__all__ = ["EarlyStopping", "FitResult", "Hooks", "NonFiniteLoss", "TrainTimeout", "evaluate_batches", "fit",
           "kept_weights"]


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    kept_epoch: int
    kept_val_loss: float
    kept_val_acc: float
    stopped_early: bool
    best_state: dict[str, torch.Tensor] = field(repr=False)
    seconds: float = 0.0
    stopped_by: Optional[str] = None  # why Hooks.stop ended the training early
    kept_because: str = ""  # which rule chose kept_epoch, in words
    lowest_val_loss_epoch: int = 0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("best_state")
        d["epochs_run"] = len(self.history)
        if d["stopped_by"] is None:
            d.pop("stopped_by")
        return d


@dataclass
class EarlyStopping:
    """Best validation loss so far, its epoch and weights; stops after `patience` epochs without a gain."""

    patience: int
    min_delta: float
    loss: float = math.inf
    epoch: int = 0
    acc: float = 0.0
    bad_epochs: int = 0

    def update(self, epoch: int, val_loss: float, val_acc: float) -> bool:
        """Record an epoch; True when it is the new best."""
        if val_loss < self.loss - self.min_delta:
            self.loss, self.epoch, self.acc, self.bad_epochs = val_loss, epoch, val_acc, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "epoch": self.epoch, "acc": self.acc, "bad_epochs": self.bad_epochs}


@dataclass
class _Progress:
    """Where a training stands between epochs: what a checkpoint holds besides the optimiser's state."""

    early: EarlyStopping
    history: list[dict[str, Any]]
    best_state: dict[str, torch.Tensor]  # the lowest val loss so far
    acc_state: dict[str, torch.Tensor]  # the highest val accuracy so far
    next_epoch: int = 1
    finished: bool = False

    def record(self, epoch: int, record: dict[str, Any], core: nn.Module, max_epochs: int) -> bool:
        """Add an epoch; True when its val loss is the new best."""
        self.history.append(record)
        if _best_accuracy(self.history) == epoch:
            self.acc_state = cpu_state(core)
        improved = self.early.update(epoch, record["val_loss"], record["val_acc"])
        if improved:
            self.best_state = cpu_state(core)
        self.finished = self.early.should_stop or epoch == max_epochs
        self.next_epoch = epoch + 1
        return improved

    def state(self) -> dict[str, Any]:
        return {"epoch": self.next_epoch - 1, "early": self.early.state(), "best_model": self.best_state,
                "best_acc_model": self.acc_state, "history": self.history, "finished": self.finished,
                "stopped_early": self.early.should_stop}

    def load(self, ck: dict[str, Any]) -> None:
        e = ck["early"]
        self.early.loss, self.early.epoch, self.early.acc, self.early.bad_epochs = \
            e["loss"], e["epoch"], e["acc"], e["bad_epochs"]
        self.next_epoch, self.finished, self.history = ck["epoch"] + 1, ck["finished"], ck["history"]
        self.best_state, self.acc_state = ck["best_model"], ck.get("best_acc_model", ck["best_model"])


def _epoch_line(r: dict[str, Any], max_epochs: int, improved: bool) -> str:
    return (f"epoch {r['epoch']}/{max_epochs} train loss {r['train_loss']:.4f} acc {r['train_acc']:.2%}"
            f" | val loss {r['val_loss']:.4f} acc {r['val_acc']:.2%} | lr {r['lr']:.2e}"
            f" | {r['epoch_seconds']:.1f}s {r['images_per_s']:.0f} img/s" + (" [best]" if improved else ""))


def kept_weights(keep: str, progress: _Progress, core: nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
    """train.keep: which epoch's weights a training returns (see bench/selection_rules.py)."""
    early = progress.early
    if keep == "best_loss":
        return early.epoch, progress.best_state
    if keep == "best_acc":
        return _best_accuracy(progress.history), progress.acc_state
    # last: the schedule's end, unless early stopping cut it short (then the best val loss)
    return (early.epoch, progress.best_state) if early.should_stop else (len(progress.history), cpu_state(core))


def fit(model: nn.Module, train: Batches, val: Batches, cfg: TrainConfig, *,
        checkpoint: Optional[Checkpointing] = None, hooks: Hooks = Hooks(), dist: DistInfo = DistInfo()) -> FitResult:
    """Train with validation after each epoch; return the history and the weights train.keep chooses.

    With `checkpoint`, every epoch is saved there (atomically) and a resume continues exactly where the
    last one ended, refused when the checkpoint's identity (model, data, train settings) differs.
    """
    step = Step.build(model, train, cfg, dist)
    progress = _Progress(EarlyStopping(cfg.patience, cfg.min_delta), [], cpu_state(model), cpu_state(model))
    if checkpoint is not None and checkpoint.restore(step.core, step.opt, step.sched, step.gen, progress.load):
        hooks.log(f"resumed from {checkpoint.path} after epoch {progress.next_epoch - 1}")
    t_fit = time.perf_counter()
    stopped_by = None
    while not progress.finished and progress.next_epoch <= cfg.max_epochs:
        epoch = progress.next_epoch
        record = run_epoch(step, train, val, epoch, checkpoint and checkpoint.path, hooks, dist)
        improved = progress.record(epoch, record, step.core, cfg.max_epochs)
        hooks.log(_epoch_line(record, cfg.max_epochs, improved))
        if hooks.on_epoch_end is not None:  # before the checkpoint: a kill in between repeats an epoch's metrics
            hooks.on_epoch_end(record)
        # Asked after the last epoch too: a pruner records every epoch's value.
        reason = hooks.stop(record) if hooks.stop is not None else None
        if reason and not progress.finished:
            stopped_by = reason
            hooks.log(f"stopped after epoch {epoch}: {reason}")
            progress.finished = True
        if checkpoint is not None and dist.is_main:
            checkpoint.save(step.core, step.opt, step.sched, step.gen, progress.state())
        if progress.early.should_stop:
            hooks.log(f"early stop: no val-loss gain for {cfg.patience} epochs; best epoch {progress.early.epoch}")
    kept_epoch, kept_state = kept_weights(cfg.keep, progress, step.core)
    step.core.load_state_dict(kept_state)
    kept = progress.history[kept_epoch - 1] if progress.history else {"val_loss": math.inf, "val_acc": 0.0}
    because = _why_kept(cfg.keep, progress.early.should_stop, kept_epoch, len(progress.history))
    hooks.log(f"keeping the weights of epoch {kept_epoch}: {because}; lowest val loss at epoch {progress.early.epoch}")
    return FitResult(progress.history, kept_epoch, kept["val_loss"], kept["val_acc"], progress.early.should_stop,
                     kept_state, time.perf_counter() - t_fit, stopped_by, because, progress.early.epoch)


def _why_kept(keep: str, stopped_early: bool, epoch: int, epochs_run: int) -> str:
    if keep == "best_loss":
        return "train.keep=best_loss: the lowest val loss"
    if keep == "best_acc":
        return "train.keep=best_acc: the highest val accuracy"
    if stopped_early:
        return "train.keep=last, but early stopping fired: the lowest val loss"
    return f"train.keep=last: the end of the schedule (epoch {epoch} of {epochs_run})"


def _best_accuracy(history: list[dict[str, Any]]) -> int:
    """The epoch with the highest val accuracy, the lower val loss breaking ties (0 before any epoch)."""
    if not history:
        return 0
    return min(history, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))["epoch"]
