"""Processed splits as tensors, and the batch sources the training loop draws from.

In memory: a split is one uint8 tensor on the training device, shuffled with
`randperm` and sliced each epoch (no per-sample Python, no workers). Streaming:
a DataLoader over the memory-mapped split file, for data that does not fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F

from ..files import read_json_file, safe_torch_load
from .datasource import data_source

if TYPE_CHECKING:
    from ..config import DataConfig


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    ids: Optional[list[str]] = None  # stable sample ids (prepare writes them); None in older splits

    def __len__(self) -> int:
        return len(self.labels)

    def sample_ids(self) -> list[str]:
        """Stable ids: the source file and index (MNIST family) or the image's path (ImageFolder)."""
        return list(self.ids) if self.ids is not None else [str(i) for i in range(len(self))]


def read_meta(path: Path, data: Optional[DataConfig] = None) -> dict:
    """prepare's record; with `data`, refused unless it was prepared from the configured source (and, for an
    ImageFolder, the configured folder): a snapshot of another folder must never pass for this one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the prepare stage first")
    meta = read_json_file(path)
    if data is not None:
        got, want = meta.get("source"), data.source
        if got != want:
            raise ValueError(f"{path}: prepared from {got}, but data.source is {want}; run download and prepare again")
        data_source(want).check_origin(path, meta.get("origin") or {}, data)
    return meta


def load_split(path: Path, mmap: bool = False) -> Split:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the prepare stage first")
    blob = safe_torch_load(path, "processed split", mmap=mmap)
    images, labels = (blob.get("images"), blob.get("labels")) if isinstance(blob, dict) else (None, None)
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and isinstance(labels, torch.Tensor) and len(labels) == len(images)):
        raise ValueError(f"{path}: not a processed split (uint8 images (N,C,H,W) and N labels)")
    ids = blob.get("ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(labels)):
        raise ValueError(f"{path}: its sample ids do not match its {len(labels)} labels")
    labels = labels.long()
    meta = path.parent / "meta.json"
    if meta.is_file() and len(labels):
        classes = read_json_file(meta).get("classes")
        n = len(classes) if isinstance(classes, list) else 0
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= n:  # sized by the class list later (confusion matrix, one-hot): refuse here
            raise ValueError(f"{path}: label {low if low < 0 else high} is outside the {n} classes of {meta}")
    return Split(images, labels, ids)


def subset_split(split: Split, n: int, seed: int) -> Split:
    """`n` samples drawn without replacement (seeded), kept in their order; the whole split if it is smaller."""
    if n >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    ids = [split.ids[i] for i in keep.tolist()] if split.ids is not None else None
    return Split(split.images[keep], split.labels[keep], ids)


def split_nbytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift], zero fill."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    dy = torch.randint(0, 2 * s + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * s + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * s)
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the images left to right."""
    flip = (torch.rand(len(x), generator=gen, device=gen.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


class Batches:
    """Yields (uint8 images, labels) batches on `device` for one epoch."""

    def __init__(self, split: Split, device: torch.device, streaming: bool = False,
                 rank: int = 0, world: int = 1):
        self.device, self.streaming, self.rank, self.world = device, streaming, rank, world
        self.split = split if streaming else Split(split.images.to(device), split.labels.to(device))

    def __len__(self) -> int:
        return len(self.split)

    def shard_size(self) -> int:
        return len(self.split) // self.world if self.world > 1 else len(self.split)

    def epoch(self, batch_size: int, gen: Optional[torch.Generator]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.split)
        if gen is None:
            order = torch.arange(n)
        else:
            order = torch.randperm(n, generator=gen, device=gen.device)
        if self.world > 1:  # same permutation on every rank, equal-length disjoint shards
            order = order[: n - n % self.world][self.rank:: self.world]
        if not self.streaming:
            order = order.to(self.device)
            for i in range(0, len(order), batch_size):
                idx = order[i: i + batch_size]
                yield self.split.images[idx], self.split.labels[idx]
            return
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(self.split.images, self.split.labels),
            batch_size=None, sampler=torch.utils.data.BatchSampler(order.cpu().tolist(), batch_size, False),
            pin_memory=self.device.type == "cuda",
        )
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
