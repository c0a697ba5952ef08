"""ImageFolder ingestion: validate a class-per-subfolder tree and decode its images (snapshots: snapshot.py)."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageFolderError(ValueError):
    """The folder cannot be used as a data set; the message names the folder."""


@dataclass
class Scan:
    root: Path
    classes: list[str]
    files: dict[str, list[Path]]  # class -> readable image files, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    stats: dict[str, list] = field(default_factory=dict)  # relative path -> [size, mtime_ns(, sha256)]
    placed: dict[str, int] = field(default_factory=dict)  # how the snapshot got its files: unchanged, copy, ...

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.files.values())


def check_image(path: Path) -> str | None:
    """None when PIL decodes the whole file, else the reason it cannot."""
    try:
        with Image.open(path) as im:
            im.load()
    except UnidentifiedImageError:
        return "not an image PIL can identify"
    except Image.DecompressionBombError as exc:
        return f"too many pixels ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt image ({exc})"
    return None


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns]


def _unusable(p: Path, real_root: Path) -> str | None:
    """Why `p` is not a file to read as an image (without opening it: a FIFO would block), else None."""
    try:
        if p.is_symlink() and not p.resolve(strict=True).is_relative_to(real_root):
            return "symlink leads outside the data folder"
        mode = p.stat().st_mode
    except RuntimeError:  # Python's "Symlink loop"
        return "symlink loop"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror or exc})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def scan(root: str | Path, log: Callable[[str], None] = lambda _: None, known: Optional[dict] = None,
         classes: Optional[list[str]] = None) -> Scan:
    """List readable images per class; unreadable files and escaping links are skipped and listed.

    `known` maps relative paths to the [size, mtime_ns] of files checked before: those are not
    decoded again. `classes` fixes the label order (default: sorted folder names).
    """
    root = Path(root)
    known = known or {}
    stats: dict[str, list[int]] = {}
    if not root.is_dir():
        raise ImageFolderError(f"{root}: data folder does not exist or is not a directory")
    real_root = root.resolve()
    skipped: list[tuple[str, str]] = []
    files: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        rel = entry.relative_to(root).as_posix()
        try:
            escapes = entry.is_symlink() and not entry.resolve(strict=True).is_relative_to(real_root)
        except (RuntimeError, OSError):  # a loop, or a link to nothing
            escapes = True
        if escapes:
            skipped.append((rel, "symlink leads outside the data folder (or nowhere)"))
            continue
        if not entry.is_dir():
            skipped.append((rel, "file at the top level (images belong in class folders)"))
            continue
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(entry, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                prel = p.relative_to(root).as_posix()
                why = _unusable(p, real_root)
                if why:
                    skipped.append((prel, why))
                    continue
                st = _stat(p)
                reason = None if (known.get(prel) or [])[:2] == st else check_image(p)
                if reason:
                    skipped.append((prel, reason))
                else:
                    found.append(p)
                    stats[prel] = st
        files[entry.name] = found
    for rel, reason in skipped:
        log(f"skipped {root / rel}: {reason}")
    empty = [c for c, v in files.items() if not v]
    if empty:
        raise ImageFolderError(f"{root / empty[0]}: class folder has no readable images")
    if len(files) < 2:
        raise ImageFolderError(
            f"{root}: found {len(files)} class folder(s) ({', '.join(files) or 'none'}); need at least 2"
        )
    if classes is not None and sorted(classes) != sorted(files):
        missing, extra = sorted(set(classes) - set(files)), sorted(set(files) - set(classes))
        raise ImageFolderError(f"{root}: data.classes does not match the class folders "
                               f"(no folder for {missing or 'none'}; not listed: {extra or 'none'})")
    return Scan(root, list(classes) if classes is not None else sorted(files), files, skipped, stats)


WIDE_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit and 32-bit integer or float grey


def _to_8bit(im: Image.Image) -> Image.Image:
    """A 16-bit or float image scaled to 8 bits by its real range (its min to its max): PIL's own
    conversion clips at 255, which turns every non-zero 16-bit pixel white."""
    arr = np.asarray(im, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = np.zeros(arr.shape) if hi <= lo else (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) / (hi - lo)
    return Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), "L")


def decode(path: Path, size: int, channels: int, conversions: Optional[dict[str, int]] = None) -> np.ndarray:
    """Decode any PIL-readable image to uint8 (channels, size, size), as it looks: EXIF orientation applied,
    16-bit and float images scaled by their range, alpha laid on black. Every conversion is counted in
    `conversions` ("<mode> -> <mode>", "EXIF orientation N"). prepare and predict both decode here."""

    def count(what: str) -> None:
        if conversions is not None:
            conversions[what] = conversions.get(what, 0) + 1

    target = "L" if channels == 1 else "RGB"
    with Image.open(path) as raw:
        raw.draft(target, (size, size))  # cheap JPEG downscale
        orientation = raw.getexif().get(0x0112, 1)
        im = ImageOps.exif_transpose(raw) if orientation not in (None, 1) else raw
        if orientation not in (None, 1):
            count(f"EXIF orientation {orientation} applied")
        if im.mode in WIDE_MODES:
            count(f"{im.mode} -> L (scaled by its range)")
            im = _to_8bit(im)
        elif im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            count(f"{im.mode} -> {target} (alpha on black)")
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        if im.mode != target:
            if im.mode not in ("RGBA",):
                count(f"{im.mode} -> {target}")
            im = im.convert(target)
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
