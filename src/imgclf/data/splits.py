"""Prepare stage: decode once into uint8 tensors, stratified seeded split, normalization stats."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from ..files import atomic_dir, sha256_file, tree_digest, write_json
from ..progress import Progress
from . import META_FILE, split_file
from .checks import enforce, image_stats, run_checks
from .datasource import data_source
from .idx import IDXError, read_pair
from .imagefolder import ImageFolderError, decode
from .snapshot import read_manifest
from .sources import IdxSource

if TYPE_CHECKING:
    from ..config import DataConfig

FIXED_MEAN, FIXED_STD = 0.5, 0.5  # the seed's Normalize((0.5,), (0.5,)): values in [-1, 1]


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    ids: np.ndarray  # str (N,): stable sample ids, "<file>:<index>" or the image's path in the data folder
    conversions: Optional[dict[str, int]] = None  # how many images needed each decoding conversion

    def take(self, idx: np.ndarray) -> "Dataset":
        return Dataset(self.images[idx], self.labels[idx], self.ids[idx], self.conversions)


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


def load_idx_source(raw_dir: Path, source: IdxSource) -> tuple[Dataset, Dataset, list[str]]:
    """The official train and test sets, labels numbered as the data set's own class list."""
    out = []
    for images_file, labels_file in (source.train, source.test):
        images, labels = read_pair(raw_dir / images_file.name, raw_dir / labels_file.name)
        if source.transpose:
            images = images.transpose(0, 1, 3, 2)
        labels = labels.astype(np.int64) - source.label_offset
        bad = (labels < 0) | (labels >= len(source.classes))
        if bad.any():
            raise IDXError(f"{raw_dir / labels_file.name}: label {labels[bad][0] + source.label_offset} is outside "
                           f"{source.name}'s {len(source.classes)} classes")
        ids = np.array([f"{images_file.name}:{i}" for i in range(len(labels))])
        out.append(Dataset(np.array(images), labels, ids))  # a writable copy for torch
    return out[0], out[1], list(source.classes)


def load_imagefolder(snapshot_dir: Path, cfg: DataConfig,
                     progress: Optional[Progress] = None) -> tuple[Dataset, list[str]]:
    """Decode a snapshot made by the download stage into one uint8 array."""
    manifest = read_manifest(snapshot_dir)
    got, want = manifest["origin"].get("path"), str(Path(cfg.path or "").resolve())
    if got != want:
        raise ImageFolderError(f"{snapshot_dir}: a snapshot of {got}, but data.path is {want}; "
                               "run the download stage first")
    classes = manifest["classes"]
    paths, labels = [], []
    for i, cls in enumerate(classes):
        found = sorted(snapshot_dir / rel for rel in manifest["files"][cls])
        paths += found
        labels += [i] * len(found)
    images = np.empty((len(paths), cfg.channels, cfg.image_size, cfg.image_size), dtype=np.uint8)
    conversions: dict[str, int] = {}
    for n, p in enumerate(paths):
        try:
            images[n] = decode(p, cfg.image_size, cfg.channels, conversions)
        except Exception as exc:
            raise ImageFolderError(f"{p}: cannot decode ({exc})") from None
        if progress:
            progress("decode", n + 1, len(paths))
    ids = np.array([p.relative_to(snapshot_dir).as_posix() for p in paths])
    return Dataset(images, np.asarray(labels, dtype=np.int64), ids, dict(sorted(conversions.items()))), classes


def build_splits(cfg: DataConfig, source_dir: Path,
                 progress: Optional[Progress] = None) -> tuple[dict[str, Dataset], list[str], Optional[dict]]:
    """The splits, their class names, and what data.corrections changed in them (None: no corrections file)."""
    full, test, classes = data_source(cfg.source).load(cfg, source_dir, progress)
    if test is None:  # a source without a test set of its own (an ImageFolder): drawn here, stratified
        rest, held = stratified_split(full.labels, cfg.test_fraction, cfg.seed)
        full, test = full.take(rest), full.take(held)
    # A seed apart from the test split's, so the two draws are independent.
    train_idx, val_idx = stratified_split(full.labels, cfg.val_fraction, cfg.seed + 1)
    splits = {"train": full.take(train_idx), "val": full.take(val_idx), "test": test}
    if cfg.max_per_split is not None:  # drawn from the splits, so a quick run's images are the full run's
        splits = {name: at_most(ds, cfg.max_per_split, cfg.seed + 2) for name, ds in splits.items()}
    applied = None
    if cfg.corrections and Path(cfg.corrections).is_file():  # after the draws: a corrected image keeps its split
        from . import corrections

        splits, applied = corrections.apply(splits, corrections.read(Path(cfg.corrections), classes))
        applied = {"file": cfg.corrections, "sha256": sha256_file(cfg.corrections), **applied}
    return splits, classes, applied


def at_most(ds: Dataset, n: int, seed: int) -> Dataset:
    """`n` images of `ds` (all when it has no more), every class kept in proportion."""
    if len(ds.labels) <= n:
        return ds
    _, held = stratified_split(ds.labels, n / len(ds.labels), seed)
    return ds.take(held)


def prepare(cfg: DataConfig, raw_dir: Path, out_dir: Path, progress: Optional[Progress] = None) -> dict:
    """Write {train,val,test}.pt and meta.json into `out_dir`; return the meta record.

    Same raw data and params give byte-identical outputs, wherever the folders are.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    source_dir = raw_dir / cfg.source
    if not source_dir.is_dir():
        raise FileNotFoundError(f"{source_dir}: no raw data; run the download stage first")
    outputs = {META_FILE, *(split_file(name) for name in ("train", "val", "test"))}
    # Entered before any decoding: a folder that is not prepare's own is refused before the work.
    with atomic_dir(out_dir, lambda names: names <= outputs, f"only {', '.join(sorted(outputs))}") as tmp:
        splits, classes, corrected = build_splits(cfg, source_dir, progress)
        checks = run_checks(splits, classes, cfg.channels, cfg.image_size, cfg.checks)
        enforce(checks)  # before anything is written: a stopped prepare leaves the last good outputs
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
            "origin": data_source(cfg.source).origin(cfg, source_dir),
            "conversions": splits["train"].conversions or {},
            "corrections": corrected,
            "checks": checks,
            "stats": {s: image_stats(d.images) for s, d in splits.items()},
            "params": dataclasses.asdict(cfg),
            "sha256": {},
        }
        for name, ds in splits.items():
            path = tmp / split_file(name)
            torch.save({"images": torch.from_numpy(ds.images), "labels": torch.from_numpy(ds.labels),
                        "ids": ds.ids.tolist()}, path)
            meta["sha256"][path.name] = sha256_file(path)
        write_json(tmp / META_FILE, meta)
    return meta
