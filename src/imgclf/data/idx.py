"""IDX files (the MNIST format), parsed with numpy. Errors are real exceptions naming the file."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..files import write_bytes

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
INT_LABELS_MAGIC = 0x00000C02  # QMNIST: big-endian int32, N rows of 8 columns (the class first)
_DTYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}


class IDXError(ValueError):
    """An IDX file that is not what it claims to be; the message names the file."""


# One IDX payload at most (EMNIST byclass's training images, the largest here, are 547 MB): a gzip of a few MiB
# can declare and expand to gigabytes, so the header's size is checked before the payload is decompressed.
MAX_IDX_BYTES = 4 << 30


def _read(path: Path) -> bytes:
    """The (decompressed) file, read no further than its header declares (plus one byte, so that padding is
    still seen); a declared size over MAX_IDX_BYTES is refused before anything large is read."""
    try:
        with open(path, "rb") as raw:
            zipped = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            fh = gzip.GzipFile(fileobj=raw) if zipped else raw
            head = fh.read(4)
            if len(head) < 4 or head[2] not in _DTYPES:
                return head + fh.read(1 << 20)  # not IDX: enough for read_idx to say what it is
            dims_raw = fh.read(4 * head[3])
            dims = [int.from_bytes(dims_raw[i: i + 4], "big") for i in range(0, len(dims_raw) - 3, 4)]
            declared = int(np.prod(dims, dtype=object)) * _DTYPES[head[2]].itemsize if dims else 0
            if declared > MAX_IDX_BYTES:
                raise IDXError(f"{path}: declares {dims} ({declared:,} bytes), more than the {MAX_IDX_BYTES:,} an "
                               "IDX file may hold here")
            return head + dims_raw + fh.read(declared + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXError(f"{path}: cannot read ({exc})") from None


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Parse an (optionally gzipped) IDX file with the expected magic number."""
    path = Path(path)
    data = _read(path)
    if len(data) < 4:
        raise IDXError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise IDXError(f"{path}: wrong magic number 0x{got:08x}, expected 0x{magic:08x}")
    ndim, dtype = magic & 0xFF, _DTYPES[(magic >> 8) & 0xFF]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: header truncated")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXError(
            f"{path}: payload is {len(data) - header} bytes, dimensions {dims} need {expected} (truncated or padded)"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _read_labels(path: Path) -> np.ndarray:
    data = _read(path)
    if data[:4] == INT_LABELS_MAGIC.to_bytes(4, "big"):
        table = read_idx(path, INT_LABELS_MAGIC)
        return table[:, 0].astype(np.int64) if table.ndim == 2 and table.shape[1] else table.reshape(-1)
    return read_idx(path, LABELS_MAGIC)


def read_pair(images_path: str | Path, labels_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, H, W) and labels (N,) from an IDX pair whose counts must agree."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = _read_labels(Path(labels_path))
    if len(images) != len(labels):
        raise IDXError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images[:, None], labels


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 (or int32) array as a gzipped IDX file (for tests and tiny fixtures)."""
    code = 0x0C if array.dtype == np.int32 else 0x08
    array = np.ascontiguousarray(array, dtype=_DTYPES[code])
    header = (code * 0x100 + array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    write_bytes(path, gzip.compress(header + array.tobytes(), mtime=0))  # a new file, never through a DVC link
