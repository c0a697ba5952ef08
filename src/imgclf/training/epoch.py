"""One epoch of training and of validation, and what they need built once per training (optimiser, schedule).

Needs only torch (and the library's own modules): it runs on a GPU worker that has nothing else installed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.batches import Batches, random_hflip, random_shift, to_float
from ..progress import Progress
from .runtime import DistInfo

EpochCallback = Callable[[dict[str, Any]], None]


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; names the epoch and batch."""


class TrainTimeout(TimeoutError):
    """Training ran past its deadline; the last checkpoint is kept for --resume."""


@dataclass
class Hooks:
    """What the caller watches or limits; nothing here changes the weights."""

    on_epoch_end: Optional[EpochCallback] = None  # the epoch's record, before its checkpoint is written
    on_batch: Optional[Progress] = None
    log: Callable[[str], None] = lambda _: None
    deadline: Optional[float] = None  # time.monotonic() past which training stops (TrainTimeout)
    # After each epoch (and on_epoch_end): a reason to end the training now (a sweep's pruner), else None.
    stop: Optional[Callable[[dict[str, Any]], Optional[str]]] = None


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


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class Step:
    """What one epoch's optimisation needs, built once per fit."""

    core: nn.Module  # the model itself; `model` is the same, or its DDP wrapper
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator
    cfg: TrainConfig
    conv: bool
    batch_size: int
    steps: int

    @classmethod
    def build(cls, core: nn.Module, train: Batches, cfg: TrainConfig, dist: DistInfo) -> "Step":
        device = train.device
        torch.manual_seed(cfg.seed)
        conv = _is_conv(core)
        if conv:
            core.to(memory_format=torch.channels_last)
        model = core
        if dist.enabled:
            model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
        batch_size = max(1, cfg.batch_size // dist.world)
        steps = math.ceil(train.shard_size() / batch_size)
        opt = make_optimizer(core, cfg)
        return cls(core, model, opt, make_scheduler(opt, cfg, steps),
                   torch.Generator(device=device).manual_seed(cfg.seed), cfg, conv, batch_size, steps)


def _train_epoch(step: Step, train: Batches, epoch: int, checkpoint: Optional[Path], hooks: Hooks) -> torch.Tensor:
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
        if hooks.on_batch is not None:
            hooks.on_batch(f"epoch {epoch}", b + 1, step.steps)
        if hooks.deadline is not None and time.monotonic() > hooks.deadline:
            raise TrainTimeout(f"training passed its timeout at epoch {epoch}, batch {b + 1}; "
                               f"last checkpoint: {checkpoint or 'none'} (epoch {epoch - 1})")
    if first_bad.item() >= 0:
        raise NonFiniteLoss(f"epoch {epoch}, batch {first_bad.item()}: loss is not finite; "
                            f"training stopped ({last_good})")
    return sums


def run_epoch(step: Step, train: Batches, val: Batches, epoch: int, checkpoint: Optional[Path], hooks: Hooks,
               dist: DistInfo) -> dict[str, Any]:
    """Train one epoch, then validate; the epoch's record."""
    t0 = time.perf_counter()
    loss, correct, n = _all_reduce(_train_epoch(step, train, epoch, checkpoint, hooks), dist).tolist()
    train_seconds = time.perf_counter() - t0
    val_loss, val_acc = evaluate_batches(step.model, val, max(step.batch_size, 512), dist)
    return {"epoch": epoch, "train_loss": loss / n, "train_acc": correct / n, "val_loss": val_loss,
            "val_acc": val_acc, "lr": step.opt.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": n / train_seconds}
