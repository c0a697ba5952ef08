"""One training loop for every model: validation each epoch, early stopping, atomic resumable checkpoints.

Needs only torch (and the library's own modules), so it runs on a GPU worker that
has nothing else installed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import Batches, random_shift, to_float
from .files import atomic_file

EpochCallback = Callable[[dict[str, Any]], None]
BatchCallback = Callable[[int, int, int], None]  # epoch, batch done, batches in epoch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; names the epoch and batch."""


class TrainTimeout(TimeoutError):
    """Training ran past its deadline; the last checkpoint is kept for --resume."""


class CheckpointMismatch(ValueError):
    """A checkpoint made with another model or data shape cannot be resumed."""


def available_cores() -> int:
    """CPUs this process may really use: affinity mask and cgroup quota, not the host's count."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def set_threads(threads: int, world: int = 1) -> int:
    n = threads or max(1, available_cores() // world)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: cuda requested but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


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
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
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


def _rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_file(path) as fh:
        torch.save(state, fh)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # a torn or foreign file: say which
        raise CheckpointMismatch(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None


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
    on_batch: Optional[BatchCallback] = None,
    log: Callable[[str], None] = lambda _: None,
    deadline: Optional[float] = None,
    dist: DistInfo = DistInfo(),
) -> FitResult:
    """Train with validation after each epoch; return the history and the best weights.

    `identity` (model architecture, data hashes, effective config) is stored in every
    checkpoint; resuming a checkpoint with a different identity is refused.
    `checkpoint_extra` is stored as is (e.g. the tracking run id, to carry on in it).
    `deadline` is a time.monotonic() value past which training stops (TrainTimeout).
    """
    device = train.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    core = model
    conv = _is_conv(core)
    if conv:
        core.to(memory_format=torch.channels_last)
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    batch_size = max(1, cfg.batch_size // dist.world)
    steps = math.ceil(train.shard_size() / batch_size)
    opt = make_optimizer(core, cfg)
    sched = make_scheduler(opt, cfg, steps)
    history: list[dict[str, Any]] = []
    best = {"loss": math.inf, "epoch": 0, "acc": 0.0, "bad_epochs": 0}
    best_state = _cpu_state(core)
    start_epoch, stopped_early = 1, False

    if resume and checkpoint is not None and checkpoint.is_file():
        ck = load_checkpoint(checkpoint)
        if identity is not None and ck.get("identity") != identity:
            raise CheckpointMismatch(f"{checkpoint}: made with other model/data/params; delete it or train without --resume")
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["scheduler"])
        history, best, best_state = ck["history"], ck["early"], ck["best_model"]
        _set_rng_state(ck["rng"], gen)
        start_epoch, stopped_early = ck["epoch"] + 1, ck["stopped_early"]
        log(f"resumed from {checkpoint} after epoch {ck['epoch']}")
        if ck["finished"]:
            start_epoch = cfg.max_epochs + 1

    t_fit = time.perf_counter()
    for epoch in range(start_epoch, cfg.max_epochs + 1):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        for b, (x, y) in enumerate(train.epoch(batch_size, gen)):
            x = random_shift(_prep(conv, x), cfg.augment_shift, gen)
            with _autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            finite = torch.isfinite(loss.detach())
            first_bad = torch.where((first_bad < 0) & ~finite, b + 1, first_bad)
            # On CPU the check is free; on GPU it is batched to avoid a sync per step.
            if (device.type == "cpu" or b % 50 == 0) and first_bad.item() >= 0:
                raise NonFiniteLoss(
                    f"epoch {epoch}, batch {first_bad.item()}: loss is {loss.item()}; training stopped "
                    f"(last good checkpoint: {checkpoint or 'none'}, epoch {epoch - 1})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.detach().argmax(1) == y).sum()
            sums[2] += len(y)
            if on_batch is not None:
                on_batch(epoch, b + 1, steps)
            if deadline is not None and time.monotonic() > deadline:
                raise TrainTimeout(f"training passed its timeout at epoch {epoch}, batch {b + 1}; "
                                   f"last checkpoint: {checkpoint or 'none'} (epoch {epoch - 1})")
        if first_bad.item() >= 0:
            raise NonFiniteLoss(f"epoch {epoch}, batch {first_bad.item()}: loss is not finite; training stopped "
                                f"(last good checkpoint: {checkpoint or 'none'}, epoch {epoch - 1})")
        train_loss, train_correct, n = _all_reduce(sums, dist).tolist()
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = evaluate_batches(core if not dist.enabled else model, val, max(batch_size, 512), dist)
        record = {
            "epoch": epoch,
            "train_loss": train_loss / n,
            "train_acc": train_correct / n,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": opt.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
            "images_per_s": n / train_seconds,
        }
        history.append(record)
        improved = val_loss < best["loss"] - cfg.min_delta
        if improved:
            best = {"loss": val_loss, "epoch": epoch, "acc": val_acc, "bad_epochs": 0}
            best_state = _cpu_state(core)
        else:
            best["bad_epochs"] += 1
        stopped_early = best["bad_epochs"] >= cfg.patience
        finished = stopped_early or epoch == cfg.max_epochs
        log(f"epoch {epoch}/{cfg.max_epochs} train loss {record['train_loss']:.4f} acc {record['train_acc']:.2%}"
            f" | val loss {val_loss:.4f} acc {val_acc:.2%} | lr {record['lr']:.2e}"
            f" | {record['epoch_seconds']:.1f}s {record['images_per_s']:.0f} img/s" + (" [best]" if improved else ""))
        if on_epoch_end is not None:  # before the checkpoint: a kill in between repeats an epoch's metrics, never loses them
            on_epoch_end(record)
        if checkpoint is not None and dist.is_main:
            save_checkpoint(checkpoint, {
                "epoch": epoch, "model": _cpu_state(core), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else {}, "early": best,
                "best_model": best_state, "history": history, "rng": _rng_state(gen),
                "identity": identity, "stopped_early": stopped_early, "finished": finished,
                "extra": checkpoint_extra or {},
            })
        if stopped_early:
            log(f"early stop: no val-loss gain for {cfg.patience} epochs; best epoch {best['epoch']}")
            break
    core.load_state_dict(best_state)
    return FitResult(history, best["epoch"], best["loss"], best["acc"], stopped_early, best_state,
                     time.perf_counter() - t_fit)
