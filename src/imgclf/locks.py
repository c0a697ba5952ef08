"""Locks between processes: one file lock (filelock's), and the exclusive hold a stage takes on the folders it
writes.

The kernel drops every lock here when its holder dies, so a killed process never leaves a stale one. The folder
hold keeps its own few lines of flock: its lock file names the holder (stage, pid, since), which is what the
second process's one-line error quotes, and filelock writes nothing into its file (its release may even
unlink it while a contender reads).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def file_lock(path: str | Path, timeout: float | None = None) -> Iterator[None]:
    """An exclusive lock between processes on `path` (filelock's flock, released by the kernel if the holder
    dies); with `timeout`, TimeoutError once it has been held by another for that long."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=-1 if timeout is None else timeout)
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(f"{path}: held by another process for {timeout:.0f} s") from None
    try:
        yield
    finally:
        lock.release()


class FolderBusy(RuntimeError):
    """Another process holds an output folder; the message names it (pid, stage, since)."""


@contextlib.contextmanager
def exclusive_folders(folders: list[Path], stage: str, wait: bool = False) -> Iterator[None]:
    """One writer per output folder: hold an exclusive lock beside each folder for the whole stage.

    A second process fails at once naming the holder, or with `wait` blocks until it is done.
    The kernel drops the lock when its holder dies, so a killed stage never leaves a stale one.
    """
    import fcntl
    import time

    held = []
    try:
        for folder in sorted({Path(f).resolve() for f in folders}):
            folder.parent.mkdir(parents=True, exist_ok=True)
            path = folder.parent / f".{folder.name}.lock"
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                fh.close()
                raise FolderBusy(f"{folder}: in use by {holder}; wait for it to finish or pass --wait") from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{stage} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            fh.flush()
            held.append(fh)
        yield
    finally:
        for fh in held:
            fh.close()  # closing releases the lock


def private_dir() -> Path:
    """A folder under the temp folder that only this user can write, for locks: a lock at a name others can
    predict in /tmp could be taken (or pre-created) by another user to block us."""
    import stat
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"imgclf-{os.geteuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise PermissionError(f"{folder}: not a private folder of this user (owner uid {st.st_uid}, mode "
                              f"{oct(st.st_mode & 0o777)}); remove it and try again")
    return folder
