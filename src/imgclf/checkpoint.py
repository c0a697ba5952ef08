"""Resumable checkpoints: atomic writes, weights-only loads, the RNG state that makes a resume exact."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .files import atomic_file
from .runtime import safe_torch_load


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    save_torch(path, state)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return safe_torch_load(path, "checkpoint")
    except ValueError as exc:
        raise CheckpointMismatch(str(exc)) from None
