"""One training loop for every model: validation each epoch, early stopping, atomic resumable checkpoints.

Needs only torch (and the library's own modules), so it runs on a GPU worker that
has nothing else installed. Over 200 lines because the loop's named steps (one epoch,
resume, early stopping, validation) read best beside the loop that calls them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointMismatch, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import Batches, random_hflip, random_shift, to_float
from .progress import Progress
from .runtime import DistInfo

EpochCallback = Callable[[dict[str, Any]], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; names the epoch and batch."""


class TrainTimeout(TimeoutError):
    """Training ran past its deadline; the last checkpoint is kept for --resume."""


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_loss: float
    best_val_acc: float
    stopped_early: bool
    best_state: dict[str, torch.Tensor] = field(repr=False)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("best_state")
        d["epochs_run"] = len(self.history)
        return d


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = max(1, cfg.max_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and total >= 8:  # OneCycleLR divides by zero on a handful of steps
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _prep(model_is_conv: bool, x: torch.Tensor) -> torch.Tensor:
    x = to_float(x)
    return x.contiguous(memory_format=torch.channels_last) if model_is_conv else x


def _all_reduce(values: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(values)
    return values


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Batches, batch_size: int, dist: DistInfo = DistInfo()
                     ) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a split (sharded and summed across ranks)."""
    model.eval()
    conv = _is_conv(model)
    sums = torch.zeros(3, dtype=torch.float64, device=batches.device)
    for x, y in batches.epoch(batch_size, None):
        with _autocast(batches.device):
            logits = model(_prep(conv, x))
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    loss, correct, n = _all_reduce(sums, dist).tolist()
    return loss / max(n, 1), correct / max(n, 1)


def _is_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


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
class _Step:
    """What one epoch's optimisation needs, built once per fit."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator
    cfg: TrainConfig
    conv: bool
    batch_size: int
    steps: int


def _train_epoch(step: _Step, train: Batches, epoch: int, checkpoint: Optional[Path],
                 on_batch: Optional[Progress], deadline: Optional[float]) -> tuple[float, float, float]:
    """One pass over the training split; returns (loss sum, correct, n) summed over ranks by the caller."""
    device = train.device
    step.model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    last_good = f"last good checkpoint: {checkpoint or 'none'}, epoch {epoch - 1}"
    for b, (x, y) in enumerate(train.epoch(step.batch_size, step.gen)):
        x = random_shift(_prep(step.conv, x), step.cfg.augment_shift, step.gen)
        if step.cfg.augment_flip:
            x = random_hflip(x, step.gen)
        with _autocast(device):
            logits = step.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=step.cfg.label_smoothing)
        finite = torch.isfinite(loss.detach())
        first_bad = torch.where((first_bad < 0) & ~finite, b + 1, first_bad)
        # On CPU the check is free; on GPU it is batched to avoid a sync per step.
        if (device.type == "cpu" or b % 50 == 0) and first_bad.item() >= 0:
            raise NonFiniteLoss(f"epoch {epoch}, batch {first_bad.item()}: loss is {loss.item()}; "
                                f"training stopped ({last_good})")
        step.opt.zero_grad(set_to_none=True)
        loss.backward()
        step.opt.step()
        if step.sched is not None:
            step.sched.step()
        sums[0] += loss.detach() * len(y)
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += len(y)
        if on_batch is not None:
            on_batch(f"epoch {epoch}", b + 1, step.steps)
        if deadline is not None and time.monotonic() > deadline:
            raise TrainTimeout(f"training passed its timeout at epoch {epoch}, batch {b + 1}; "
                               f"last checkpoint: {checkpoint or 'none'} (epoch {epoch - 1})")
    if first_bad.item() >= 0:
        raise NonFiniteLoss(f"epoch {epoch}, batch {first_bad.item()}: loss is not finite; "
                            f"training stopped ({last_good})")
    return sums


def _resume(checkpoint: Path, identity: Optional[dict[str, Any]], core: nn.Module, step: _Step,
            early: EarlyStopping) -> tuple[int, bool, list, dict, dict]:
    """Restore model, optimizer, scheduler, RNG and early-stopping state; returns
    (next epoch, finished, history, best-loss weights, best-accuracy weights)."""
    ck = load_checkpoint(checkpoint)
    if identity is not None and ck.get("identity") != identity:
        raise CheckpointMismatch(f"{checkpoint}: made with other model/data/params; delete it or train without --resume")
    core.load_state_dict(ck["model"])
    step.opt.load_state_dict(ck["optimizer"])
    if step.sched is not None:
        step.sched.load_state_dict(ck["scheduler"])
    early.loss, early.epoch, early.acc, early.bad_epochs = (ck["early"][k] for k in ("loss", "epoch", "acc", "bad_epochs"))
    set_rng_state(ck["rng"], step.gen)
    return ck["epoch"] + 1, ck["finished"], ck["history"], ck["best_model"], ck.get("best_acc_model", ck["best_model"])


def fit(
    model: nn.Module,
    train: Batches,
    val: Batches,
    cfg: TrainConfig,
    *,
    checkpoint: Optional[Path] = None,
    resume: bool = False,
    identity: Optional[dict[str, Any]] = None,
    checkpoint_extra: Optional[dict[str, Any]] = None,
    on_epoch_end: Optional[EpochCallback] = None,
    on_batch: Optional[Progress] = None,
    log: Callable[[str], None] = lambda _: None,
    deadline: Optional[float] = None,
    dist: DistInfo = DistInfo(),
    before_epoch: Optional[Callable[[], Any]] = None,
) -> FitResult:
    """Train with validation after each epoch; return the history and the best weights.

    `identity` (model architecture, data hashes, effective config) is stored in every
    checkpoint; resuming a checkpoint with a different identity is refused.
    `checkpoint_extra` is stored as is (e.g. the tracking run id, to carry on in it).
    `deadline` is a time.monotonic() value past which training stops (TrainTimeout).
    `before_epoch` runs at each epoch's start (e.g. re-dividing the cores among trainings).
    """
    device = train.device
    torch.manual_seed(cfg.seed)
    core = model
    conv = _is_conv(core)
    if conv:
        core.to(memory_format=torch.channels_last)
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    batch_size = max(1, cfg.batch_size // dist.world)
    steps = math.ceil(train.shard_size() / batch_size)
    opt = make_optimizer(core, cfg)
    step = _Step(model, opt, make_scheduler(opt, cfg, steps), torch.Generator(device=device).manual_seed(cfg.seed),
                 cfg, conv, batch_size, steps)
    early = EarlyStopping(cfg.patience, cfg.min_delta)
    history: list[dict[str, Any]] = []
    best_state = acc_state = _cpu_state(core)
    start_epoch, finished = 1, False
    if resume and checkpoint is not None and checkpoint.is_file():
        start_epoch, finished, history, best_state, acc_state = _resume(checkpoint, identity, core, step, early)
        log(f"resumed from {checkpoint} after epoch {start_epoch - 1}")

    t_fit = time.perf_counter()
    for epoch in range(start_epoch, cfg.max_epochs + 1):
        if finished:
            break
        if before_epoch is not None:
            before_epoch()
        t0 = time.perf_counter()
        train_loss, train_correct, n = _all_reduce(_train_epoch(step, train, epoch, checkpoint, on_batch, deadline),
                                                   dist).tolist()
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate_batches(core if not dist.enabled else model, val, max(batch_size, 512), dist)
        record = {"epoch": epoch, "train_loss": train_loss / n, "train_acc": train_correct / n,
                  "val_loss": val_loss, "val_acc": val_acc, "lr": opt.param_groups[0]["lr"],
                  "epoch_seconds": time.perf_counter() - t0, "images_per_s": n / train_seconds}
        history.append(record)
        if _best_accuracy(history) == epoch:
            acc_state = _cpu_state(core)
        improved = early.update(epoch, val_loss, val_acc)
        if improved:
            best_state = _cpu_state(core)
        finished = early.should_stop or epoch == cfg.max_epochs
        log(f"epoch {epoch}/{cfg.max_epochs} train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}"
            f" | val loss {val_loss:.4f} acc {val_acc:.2%} | lr {record['lr']:.2e}"
            f" | {record['epoch_seconds']:.1f}s {record['images_per_s']:.0f} img/s" + (" [best]" if improved else ""))
        if on_epoch_end is not None:  # before the checkpoint: a kill in between repeats an epoch's metrics, never loses them
            on_epoch_end(record)
        if checkpoint is not None and dist.is_main:
            save_checkpoint(checkpoint, {
                "epoch": epoch, "model": _cpu_state(core), "optimizer": opt.state_dict(),
                "scheduler": step.sched.state_dict() if step.sched is not None else {}, "early": early.state(),
                "best_model": best_state, "best_acc_model": acc_state, "history": history, "rng": rng_state(step.gen),
                "identity": identity, "stopped_early": early.should_stop, "finished": finished,
                "extra": checkpoint_extra or {},
            })
        if early.should_stop:
            log(f"early stop: no val-loss gain for {cfg.patience} epochs; best epoch {early.epoch}")
    kept_epoch, kept_state = {
        "best_loss": (early.epoch, best_state),
        "best_acc": (_best_accuracy(history), acc_state),
        # the schedule's end, unless early stopping cut it short (then the best val loss)
        "last": (early.epoch, best_state) if early.should_stop else (len(history), _cpu_state(core)),
    }[cfg.keep]
    core.load_state_dict(kept_state)
    kept = history[kept_epoch - 1] if history else {"val_loss": math.inf, "val_acc": 0.0}
    if kept_epoch != early.epoch:
        log(f"keeping the weights of epoch {kept_epoch} (train.keep={cfg.keep}); lowest val loss was at epoch {early.epoch}")
    return FitResult(history, kept_epoch, kept["val_loss"], kept["val_acc"], early.should_stop, kept_state,
                     time.perf_counter() - t_fit)


def _best_accuracy(history: list[dict[str, Any]]) -> int:
    """The epoch with the highest val accuracy, the lower val loss breaking ties (0 before any epoch)."""
    if not history:
        return 0
    return min(history, key=lambda r: (-r["val_acc"], r["val_loss"], r["epoch"]))["epoch"]
