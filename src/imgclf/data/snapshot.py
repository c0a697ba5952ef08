"""Snapshots of an ImageFolder in data/raw, made incrementally and without needless copies.

A file whose size and modification time match the last snapshot's record is neither checked
nor copied again, but linked from that snapshot. New files are reflinked where the file system
can (copy-on-write, no extra space), else copied, or hard linked when `runtime.link` is hardlink.
DVC's cache then shares the snapshot's files by hard link (`.dvc/config` cache.type), so the
data is stored once beside the source rather than three times.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

from ..files import atomic_dir, read_json_file, sha256_file, write_json
from .imagefolder import ImageFolderError, Scan, scan

MANIFEST = "manifest.json"
FICLONE = 0x40049409  # Linux ioctl: share the source's blocks (btrfs, XFS, ...)


def read_manifest(snapshot_dir: Path) -> dict:
    path = snapshot_dir / MANIFEST
    if not path.is_file():
        raise ImageFolderError(f"{path}: missing; run the download stage first")
    manifest = read_json_file(path)
    if not isinstance(manifest, dict) or not {"classes", "files", "stats", "origin"} <= set(manifest):
        raise ImageFolderError(f"{path}: not a snapshot manifest of this version; run the download stage again")
    classes, files = manifest["classes"], manifest["files"]
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and isinstance(files, dict)
            and set(files) == set(classes) and all(isinstance(v, list) for v in files.values())):
        raise ImageFolderError(f"{path}: its classes and files do not match; run the download stage again")
    real = snapshot_dir.resolve()
    for cls, rels in files.items():
        for rel in rels:
            parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
            # Only files of the snapshot itself: no absolute path, no '..', no link out of it.
            if not parts or parts[0] != cls or ".." in parts or rel.startswith("/") or \
                    not (snapshot_dir / rel).resolve().is_relative_to(real):
                raise ImageFolderError(f"{path}: lists {str(rel)[:200]!r}, which is not a file of the snapshot "
                                       f"under its class {cls!r}; run the download stage again")
    return manifest


def _clone(src: Path, dst: Path) -> bool:
    """Reflink `src` to `dst` when the file system shares blocks; False where it cannot."""
    import fcntl

    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        return True
    except OSError:
        dst.unlink(missing_ok=True)
        return False


def _place(src: Path, dst: Path, link: str) -> str:
    if link == "hardlink":
        try:
            os.link(src, dst)
            return "hardlink"
        except OSError:  # another file system: fall back to a copy
            pass
    if link == "auto" and _clone(src, dst):
        return "reflink"
    shutil.copyfile(src, dst)
    return "copy"


def snapshot(src: str | Path, dest: str | Path, log: Callable[[str], None] = lambda _: None, link: str = "auto",
             classes: Optional[list[str]] = None) -> Scan:
    """The readable images of `src` in `dest` (swapped in atomically) with a manifest.

    Files unchanged since the last snapshot are hard linked from it (no copy, no check);
    the others are placed by `link`: auto (reflink where possible, else copy), copy, hardlink.
    """
    dest = Path(dest)
    previous: dict = {}
    if (dest / MANIFEST).is_file():
        try:
            last = read_manifest(dest)
            # Only a snapshot of this same folder vouches for its files (a copy of a folder keeps mtimes).
            previous = last["stats"] if last["origin"].get("path") == str(Path(src).resolve()) else {}
        except (ImageFolderError, ValueError, AttributeError):
            previous = {}  # an older or damaged manifest: check and copy everything again
    found = scan(src, log, previous, classes)
    how: dict[str, int] = {}
    with atomic_dir(dest, lambda names: MANIFEST in names, f"an image snapshot with its {MANIFEST}") as tmp:
        for paths in found.files.values():
            for p in paths:
                rel = p.relative_to(found.root).as_posix()
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                kept = dest / rel
                before = previous.get(rel) or []
                if before[:2] == found.stats[rel] and len(before) == 3 and kept.is_file():
                    os.link(kept, out)
                    way = "unchanged"
                    found.stats[rel] = before
                else:
                    way = _place(p, out, link)
                    found.stats[rel] = [*found.stats[rel], sha256_file(out)]
                how[way] = how.get(way, 0) + 1
        digest = hashlib.sha256()
        for cls in found.classes:
            for p in found.files[cls]:
                rel = p.relative_to(found.root).as_posix()
                digest.update(f"{rel}\0{found.stats[rel][2]}\n".encode())
        write_json(tmp / MANIFEST, {
            # What this snapshot is of: the folder, and one digest of its file list and contents.
            "origin": {"path": str(Path(src).resolve()), "digest": digest.hexdigest()},
            "classes": found.classes,
            "counts": {c: len(found.files[c]) for c in found.classes},
            "files": {c: [p.relative_to(found.root).as_posix() for p in found.files[c]] for c in found.classes},
            "stats": found.stats,
            "skipped": [{"path": r, "reason": why} for r, why in found.skipped],
        })
    found.placed = how
    return found
