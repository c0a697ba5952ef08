"""Prepare stage: decode once into uint8 tensors, stratified seeded split, normalization stats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import PREPARE_KEYS, DataConfig
from .files import atomic_dir, read_json_file, sha256_file, tree_digest, write_json
from .idx import IDXError, read_pair
from .imagefolder import ImageFolderError, decode
from .layout import META_FILE, split_file
from .progress import Progress

FIXED_MEAN, FIXED_STD = 0.5, 0.5  # the seed's Normalize((0.5,), (0.5,)): values in [-1, 1]
MNIST_CLASSES = [str(d) for d in range(10)]


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, held) with `fraction` of every class held out.

    Largest-remainder rounding: the held total is round(N * fraction) and every
    class is within one sample of its proportional share.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * fraction
    take = np.floor(exact).astype(np.int64)
    short = int(round(len(labels) * fraction)) - int(take.sum())
    order = np.argsort(-(exact - take), kind="stable")
    take[order[:max(short, 0)]] += 1
    take = np.minimum(take, counts - 1)  # every class keeps at least one sample on the rest side
    rest, held = [], []
    for cls, k in zip(classes, take):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def normalization_stats(train_images: np.ndarray, kind: str) -> dict:
    channels = train_images.shape[1]
    if kind == "fixed":
        return {"kind": "fixed", "mean": [FIXED_MEAN] * channels, "std": [FIXED_STD] * channels}
    x = train_images.astype(np.float64) / 255.0
    mean = x.mean(axis=(0, 2, 3))
    std = np.maximum(x.std(axis=(0, 2, 3)), 1e-6)
    return {"kind": "fitted", "mean": [round(float(m), 8) for m in mean], "std": [round(float(s), 8) for s in std]}


def load_mnist(raw_dir: Path) -> tuple[Dataset, Dataset, list[str]]:
    train = read_pair(raw_dir / "train-images-idx3-ubyte.gz", raw_dir / "train-labels-idx1-ubyte.gz")
    test = read_pair(raw_dir / "t10k-images-idx3-ubyte.gz", raw_dir / "t10k-labels-idx1-ubyte.gz")
    for path, (_, labels) in (("train-labels-idx1-ubyte.gz", train), ("t10k-labels-idx1-ubyte.gz", test)):
        if labels.size and labels.max() > 9:
            raise IDXError(f"{raw_dir / path}: label {labels.max()} is not a digit 0-9")
    as_ds = lambda pair: Dataset(np.array(pair[0]), pair[1].astype(np.int64))  # noqa: E731
    return as_ds(train), as_ds(test), MNIST_CLASSES


def load_imagefolder(snapshot_dir: Path, cfg: DataConfig,
                     progress: Optional[Progress] = None) -> tuple[Dataset, list[str]]:
    """Decode a snapshot made by the download stage into one uint8 array."""
    manifest_path = snapshot_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ImageFolderError(f"{manifest_path}: missing; run the download stage first")
    classes = read_json_file(manifest_path)["classes"]
    paths, labels = [], []
    for i, cls in enumerate(classes):
        found = sorted(p for p in (snapshot_dir / cls).rglob("*") if p.is_file())
        paths += found
        labels += [i] * len(found)
    images = np.empty((len(paths), cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
    for n, p in enumerate(paths):
        try:
            images[n] = decode(p, cfg.image_size, cfg.channels)
        except Exception as exc:
            raise ImageFolderError(f"{p}: cannot decode ({exc})") from None
        if progress:
            progress("decode", n + 1, len(paths))
    return Dataset(images, np.asarray(labels, dtype=np.int64)), classes


def build_splits(cfg: DataConfig, raw_dir: Path,
                 progress: Optional[Progress] = None) -> tuple[dict[str, Dataset], list[str]]:
    if cfg.source == "mnist":
        full, test, classes = load_mnist(raw_dir / "mnist")
    else:
        everything, classes = load_imagefolder(raw_dir / "imagefolder", cfg, progress)
        rest, held = stratified_split(everything.labels, cfg.test_fraction, cfg.seed)
        full = Dataset(everything.images[rest], everything.labels[rest])
        test = Dataset(everything.images[held], everything.labels[held])
    # A seed apart from the test split's, so the two draws are independent.
    train_idx, val_idx = stratified_split(full.labels, cfg.val_fraction, cfg.seed + 1)
    splits = {
        "train": Dataset(full.images[train_idx], full.labels[train_idx]),
        "val": Dataset(full.images[val_idx], full.labels[val_idx]),
        "test": test,
    }
    return splits, classes


def prepare(cfg: DataConfig, progress: Optional[Progress] = None) -> dict:
    """Write data/processed/{train,val,test}.pt and meta.json; return the meta record.

    Same raw data and params give byte-identical outputs.
    """
    raw_dir, out_dir = Path(cfg.raw_dir), Path(cfg.processed_dir)
    source_dir = raw_dir / cfg.source
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: no raw data; run the download stage first")
    splits, classes = build_splits(cfg, raw_dir, progress)
    norm = normalization_stats(splits["train"].images, cfg.normalization)
    meta = {
        "source": cfg.source,
        "classes": classes,
        "image_shape": list(splits["train"].images.shape[1:]),
        "normalization": norm,
        "sizes": {s: int(len(d.labels)) for s, d in splits.items()},
        "counts": {s: {classes[c]: int((d.labels == c).sum()) for c in range(len(classes))}
                   for s, d in splits.items()},
        "raw_sha256": tree_digest(source_dir),
        "params": {k: getattr(cfg, k) for k in PREPARE_KEYS},
        "sha256": {},
    }
    with atomic_dir(out_dir) as tmp:
        for name, ds in splits.items():
            path = tmp / split_file(name)
            torch.save({"images": torch.from_numpy(ds.images), "labels": torch.from_numpy(ds.labels)}, path)
            meta["sha256"][path.name] = sha256_file(path)
        write_json(tmp / META_FILE, meta)
    return meta
