"""Where training runs: cores, device, and the distributed process group around one training."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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
    """The run's thread count, fixed for the whole training: runtime.threads, else this process's cores
    (split between DDP ranks). It never follows the machine's load: on CPU the thread count changes how
    sums are split, so a count that depended on other trainings would make the same params and data give
    different weights. Concurrent trainings share the cores through the OS scheduler instead."""
    n = threads or max(1, available_cores() // world)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device: cuda requested but no CUDA device is available")
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
