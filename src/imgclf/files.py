"""Atomic writes and content hashes: nothing half-written is ever left under a real name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync and rename it over `target`.

    On any exception (a full disk included) the temp file is removed and `target`
    keeps its previous content.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `target` only once it is complete and synced.

    On Linux the data goes to an anonymous file (O_TMPFILE) that gets a name only when
    done, so even SIGKILL or a full disk mid-write leaves no stray file behind, and
    `target` keeps its previous content. Elsewhere, a named temp file as in atomic_path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(target.parent, os.O_TMPFILE | os.O_WRONLY, 0o666)
    except (AttributeError, OSError):  # no O_TMPFILE here, or a file system without it
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            yield fh
        return
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh  # an exception here closes fd and the kernel frees the unnamed data
            fh.flush()
            os.fsync(fh.fileno())
            tmp = f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            # linkat(AT_SYMLINK_FOLLOW); a dir fd makes Python call linkat rather than link
            os.link(f"/proc/self/fd/{fh.fileno()}", tmp, dst_dir_fd=dir_fd, follow_symlinks=True)
        try:
            os.replace(tmp, target.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)
    except OSError as exc:  # e.g. a full disk: say which file, and that the old one stands
        raise OSError(exc.errno, f"cannot write {target} ({exc.strerror or exc}); "
                                 "its previous version, if any, is kept") from exc
    finally:
        os.close(dir_fd)


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_file(target) as fh:
        fh.write(data)


def write_json(target: str | Path, obj: Any) -> None:
    write_bytes(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class NotOurFolder(RuntimeError):
    """A folder a stage would replace holds something the stage did not write."""


def _ours(target: Path, own: Callable[[set[str]], bool]) -> bool:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return False
    return not target.exists() or own({p.name for p in target.iterdir()})


@contextlib.contextmanager
def atomic_dir(target: str | Path, own: Callable[[set[str]], bool], what: str) -> Iterator[Path]:
    """Build a directory in a temp sibling, then swap it in place of `target`.

    `target` must be missing, empty or the stage's own (`own(names of its entries)`): a folder holding
    anything else is refused before any work, naming `what` it should hold, so a mistyped path never
    deletes a user's files. Callers hold the folder's stage lock, so temp siblings left by a killed
    run are stale: they are removed, and a swap cut between its two renames is completed backwards.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and not target.is_symlink() and old.is_dir():
        os.replace(old, target)  # killed after moving the last version aside: put it back
    if not _ours(target, lambda names: not names or own(names)):
        raise NotOurFolder(f"{target}: holds files this stage did not write (expected {what}); "
                           "refusing to replace it; choose another folder or empty it")
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def read_json_file(path: str | Path) -> Any:
    """JSON from a file, with the file named when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    return file_digest(path, "sha256", chunk)


def file_digest(path: str | Path, algorithm: str, chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digest(root: str | Path) -> str:
    """One sha256 over every file's relative path and content, in sorted order."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def safe_torch_load(path: Path, what: str, **kwargs):
    """torch.load with weights_only (never arbitrary pickle); a foreign or torn file is one line naming it."""
    import torch  # here: the other helpers serve commands that never load torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu", **kwargs)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many types; none of their advice applies here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if "weights_only" in first or "Weights only" in first else f": {first[:160]}"
        raise ValueError(f"{path}: not a {what} this project wrote, or damaged "
                         f"({type(exc).__name__}{hint}); rerun the stage that makes it") from exc
