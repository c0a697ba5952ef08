"""Where training runs: cores, device, and the distributed process group around one training."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch


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


@contextlib.contextmanager
def distributed(device_name: str) -> Iterator[DistInfo]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) for the block; a no-op alone."""
    dist = DistInfo.from_env()
    joined = False
    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device_name != "cpu" and torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        joined = True
    try:
        yield dist
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def safe_torch_load(path: Path, what: str, **kwargs):
    """torch.load with weights_only (never arbitrary pickle); a foreign or torn file is one line naming it."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types; none of their advice applies here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if "weights_only" in first or "Weights only" in first else f": {first[:160]}"
        raise ValueError(f"{path}: not a {what} this project wrote, or damaged "
                         f"({type(exc).__name__}{hint}); rerun the stage that makes it") from exc


class CoreShare:
    """Trainings on one machine split its cores instead of each taking all of them.

    Each training holds a locked file in a per-user folder; `threads()` is the cores divided by
    the trainings alive now (a dead one's lock is gone with it). Recomputed each epoch, so a
    training speeds up again when the other one ends. An explicit train.threads wins.
    """

    def __init__(self, requested: int = 0, folder: Optional[Path] = None):
        import tempfile

        self.requested = requested
        self.folder = folder or Path(os.environ.get("IMGCLF_SHARE_DIR") or tempfile.gettempdir()) / \
            f"imgclf-trainings-{os.getuid()}"
        self._fh = None

    def __enter__(self) -> "CoreShare":
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{os.getpid()}-{id(self):x}"
        self._fh = open(self.folder / f"{name}.tmp", "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        os.replace(self.folder / f"{name}.tmp", self.folder / f"{name}.training")  # counted only once locked
        self._path = self.folder / f"{name}.training"
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._path.unlink(missing_ok=True)
            self._fh.close()
            self._fh = None

    def active(self) -> int:
        import fcntl

        alive = 0
        for path in self.folder.glob("*.training"):
            if self._fh is not None and path == self._path:
                alive += 1
                continue
            try:
                with open(path) as fh:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)  # nobody holds it: its training is gone
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return max(1, alive)

    def threads(self) -> int:
        if self.requested:
            n = self.requested
        else:
            n = max(1, available_cores() // self.active())  # each torchrun rank counts as one training
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n
