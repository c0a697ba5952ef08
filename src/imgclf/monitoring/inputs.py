"""A batch to score: a folder of images (any depth) or an IDX images file, decoded as prepare decodes.

A file that cannot be used is listed with its reason and the rest are scored: one corrupt upload must not
hold up ten thousand good ones. Every scored input carries a content hash, so a prediction can be traced
to the exact bytes it was made from.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from ..data.idx import IMAGES_MAGIC, IDXError, read_idx
from ..data.imagefolder import ImageFolderError, _unusable, decode
from ..progress import Progress

MAX_IMAGE_BYTES = 64 * 2**20
SCORED = "scored"  # an inbox's sub-folder of files already scored (flows/inference.py moves them there)


@dataclass
class Batch:
    images: np.ndarray  # uint8 (N, C, H, W), as the model takes them
    ids: list[str]  # the file's path relative to the folder, or "<idx file>:<index>"
    hashes: list[str]  # sha256 of the file's bytes (an IDX row: of its pixels), 16 hex digits
    sizes: Optional[np.ndarray] = None  # (N, 2) width and height before resizing; files only
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    files: list[Path] = field(default_factory=list)  # every file read, scored or rejected (a folder batch)

    def __len__(self) -> int:
        return len(self.ids)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_idx(path: Path) -> bool:
    return path.is_file() and ("idx3" in path.name or path.suffix in (".idx", ".idx3"))


def list_images(root: Path, settle_s: float = 0.0) -> list[Path]:
    """Every file under `root`, sorted, hidden files and folders and the inbox's scored/ left out; with
    `settle_s`, also files changed in the last settle_s seconds (an upload may still be writing them)."""
    out = []
    newest = time.time() - settle_s
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d == SCORED))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return sorted(p for p in out if not settle_s or p.is_symlink() or p.stat().st_mtime <= newest)


def read_folder(root: Path, channels: int, size: int, progress: Optional[Progress] = None,
                limit: Optional[int] = None, settle_s: float = 0.0) -> Batch:
    files = list_images(root, settle_s)[:limit]
    real_root = root.resolve()
    images = np.empty((len(files), channels, size, size), dtype=np.uint8)
    ids, hashes, sizes, kept, rejected = [], [], [], [], []
    for i, p in enumerate(files):
        rel = p.relative_to(root).as_posix()
        why = _unusable(p, real_root) or (f"larger than {MAX_IMAGE_BYTES // 2**20} MiB"
                                          if p.stat().st_size > MAX_IMAGE_BYTES else None)
        if why is None:
            try:
                with Image.open(p) as im:
                    width, height = im.size
                images[len(ids)] = decode(p, size, channels)
            except Exception as exc:  # PIL raises many kinds for a bad file; each is a reason, not a crash
                why = f"not a usable image ({type(exc).__name__}: {str(exc)[:120]})"
        if why:
            rejected.append((rel, why))
        else:
            ids.append(rel)
            hashes.append(_digest(p.read_bytes()))
            sizes.append((width, height))
        kept.append(p)
        if progress and (i + 1) % 500 == 0:
            progress("decode", i + 1, len(files))
    return Batch(images[: len(ids)], ids, hashes, np.array(sizes, dtype=np.float64).reshape(-1, 2), rejected, kept)


def read_idx_batch(path: Path, channels: int, size: int, limit: Optional[int] = None) -> Batch:
    raw = read_idx(path, IMAGES_MAGIC)
    if raw.shape[1:] != (size, size) or channels != 1:
        raise IDXError(f"{path}: images are 1x{raw.shape[1]}x{raw.shape[2]}; the model takes {channels}x{size}x{size}")
    images = np.ascontiguousarray(raw[:limit, None])
    return Batch(images, [f"{path.name}:{i}" for i in range(len(images))], [_digest(x.tobytes()) for x in images])


def read_batch(source: str | Path, channels: int, size: int, progress: Optional[Progress] = None,
               limit: Optional[int] = None, settle_s: float = 0.0) -> Batch:
    """The images under a folder or in an IDX file; a one-line error when there is nothing to score."""
    path = Path(source)
    if path.is_dir():
        batch = read_folder(path, channels, size, progress, limit, settle_s)
    elif is_idx(path):
        batch = read_idx_batch(path, channels, size, limit)
    elif path.exists():
        raise ImageFolderError(f"{path}: not a folder of images or an IDX images file (…idx3-ubyte[.gz])")
    else:
        raise ImageFolderError(f"{path}: no such folder or file")
    if not len(batch):
        why = f"; {len(batch.rejected)} rejected, first {batch.rejected[0][0]}: {batch.rejected[0][1]}" \
            if batch.rejected else ""
        raise ImageFolderError(f"{path}: no usable images{why}")
    return batch
