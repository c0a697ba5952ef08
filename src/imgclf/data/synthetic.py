"""A synthetic MNIST: IDX archives in MNIST's names and format whose class is a bright band at a
class-specific height, so that any model learns it in an epoch. What the tests train on, and the benchmarks'
`--tiny` data: wiring checked in seconds, with the same files a real mirror serves.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .idx import write_idx
from .sources import RawFile

MNIST_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def separable_digits(n: int, seed: int, n_classes: int = 10, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright horizontal band at a class-specific height: trivially learnable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    band = size // n_classes
    for i, c in enumerate(labels):
        images[i, c * band: c * band + max(band, 1), :] = 255
    return images, labels.astype(np.uint8)


def make_mnist_dir(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> list[RawFile]:
    """Write the four MNIST archives (tiny, separable) into `root`; return their specs (name, MD5)."""
    root.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = separable_digits(n_train, seed)
    te_x, te_y = separable_digits(n_test, seed + 1)
    for name, arr in zip(MNIST_NAMES, (tr_x, tr_y, te_x, te_y)):
        write_idx(root / name, arr)
    return [RawFile(name, hashlib.md5((root / name).read_bytes()).hexdigest()) for name in MNIST_NAMES]
