"""ImageFolder ingestion: validate a class-per-subfolder tree, snapshot it, decode images."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .files import atomic_dir, write_json


class ImageFolderError(ValueError):
    """The folder cannot be used as a data set; the message names the folder."""


@dataclass
class Scan:
    root: Path
    classes: list[str]
    files: dict[str, list[Path]]  # class -> readable image files, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

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


def scan(root: str | Path, log: Callable[[str], None] = lambda _: None) -> Scan:
    """List readable images per class; unreadable files and escaping links are skipped and listed."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: data folder does not exist or is not a directory")
    real_root = root.resolve()
    skipped: list[tuple[str, str]] = []
    files: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        rel = entry.relative_to(root).as_posix()
        if not entry.is_dir():
            skipped.append((rel, "file at the top level (images belong in class folders)"))
            continue
        if entry.is_symlink() and not entry.resolve().is_relative_to(real_root):
            skipped.append((rel, "symlink leads outside the data folder"))
            continue
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(entry, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                prel = p.relative_to(root).as_posix()
                if p.is_symlink() and not p.resolve().is_relative_to(real_root):
                    skipped.append((prel, "symlink leads outside the data folder"))
                    continue
                reason = check_image(p)
                if reason:
                    skipped.append((prel, reason))
                else:
                    found.append(p)
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
    return Scan(root, sorted(files), files, skipped)


def snapshot(src: str | Path, dest: str | Path, log: Callable[[str], None] = lambda _: None) -> Scan:
    """Copy the readable images of `src` into `dest` (swapped in atomically) with a manifest."""
    found = scan(src, log)
    with atomic_dir(dest) as tmp:
        for paths in found.files.values():
            for p in paths:
                out = tmp / p.relative_to(found.root)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out)
        write_json(tmp / "manifest.json", {
            "classes": found.classes,
            "counts": {c: len(found.files[c]) for c in found.classes},
            "skipped": [{"path": r, "reason": why} for r, why in found.skipped],
        })
    return found


def decode(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode any PIL-readable image to uint8 (channels, size, size); alpha is laid on black."""
    with Image.open(path) as im:
        im.draft("L" if channels == 1 else "RGB", (size, size))  # cheap JPEG downscale
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else np.ascontiguousarray(arr.transpose(2, 0, 1))
