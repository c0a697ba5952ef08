"""Resumable checkpoints: atomic writes, weights-only loads, the RNG state that makes a resume exact."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..files import atomic_file, safe_torch_load


class CheckpointMismatch(ValueError):
    """A checkpoint made with another model or data shape cannot be resumed."""


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "gen": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["gen"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically. Serialized in memory first, so a full disk is an OSError naming the file
    (torch's own writer reports it as an opaque 'unexpected pos' RuntimeError)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_file(path) as fh:
        fh.write(buf.getbuffer())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return safe_torch_load(path, "checkpoint")
    except ValueError as exc:
        raise CheckpointMismatch(str(exc)) from None


@dataclass
class Checkpointing:
    """Where a training saves each epoch, whether it resumes from there, and what must match to resume.

    `identity` (architecture, data hashes, the resolved train settings; never runtime or paths) is stored in
    every checkpoint; `extra` is stored as is (the tracking run id, to carry on in it). `on_saved(path, epoch)`
    is called after each save (a remote worker copies the file where another worker can resume from it);
    `resumed_after` is the epoch `restore` resumed after, None when it did not."""

    path: Path
    resume: bool = False
    identity: Optional[dict[str, Any]] = None
    extra: dict[str, Any] = field(default_factory=dict)
    on_saved: Optional[Callable[[Path, int], None]] = None
    resumed_after: Optional[int] = None

    def restore(self, model, opt, sched, gen: torch.Generator, load_progress: Callable[[dict], None]) -> bool:
        """Model, optimiser, schedule, RNG and the loop's progress from the checkpoint; False when not resuming."""
        if not (self.resume and self.path.is_file()):
            return False
        ck = load_checkpoint(self.path)
        if self.identity is not None and ck.get("identity") != self.identity:
            raise CheckpointMismatch(f"{self.path}: made with other model/data/train settings; delete it or train "
                                     "without --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if sched is not None:
            sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"], gen)
        load_progress(ck)
        self.resumed_after = int(ck["epoch"])
        return True

    def save(self, model, opt, sched, gen: torch.Generator, progress: dict[str, Any]) -> None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        save_torch(self.path, {**progress, "model": state, "optimizer": opt.state_dict(),
                               "scheduler": sched.state_dict() if sched is not None else {}, "rng": rng_state(gen),
                               "identity": self.identity, "extra": self.extra})
        if self.on_saved is not None:
            self.on_saved(self.path, int(progress["epoch"]))
