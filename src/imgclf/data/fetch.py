"""Downloads for the MNIST family: mirrors, retries with backoff, checksums, atomic writes."""

from __future__ import annotations

import http.client
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from ..files import atomic_file
from ..progress import Progress
from ..urls import redact, without_credentials
from .checksums import Digest, verify_file
from .sources import RawFile
from .watchdog import Watchdog, watched_opener

MIRROR_ENV = "IMGCLF_MIRROR"

Log = Callable[[str], None]


class DownloadError(RuntimeError):
    """No mirror gave a verified copy of a file."""


class _Transient(Exception):
    """Worth retrying on the same mirror (network hiccup, 5xx, short read)."""


class _Permanent(Exception):
    """Not worth retrying on this mirror (404, checksum mismatch)."""


@dataclass(frozen=True)
class FetchResult:
    name: str
    path: Path
    mirror: Optional[str]  # None when a verified copy was already present
    bytes: int
    seconds: float


def _is_url(mirror: str) -> bool:
    return urllib.parse.urlparse(mirror).scheme in ("http", "https", "file")


class _TooSlow(Exception):
    """Under the low-speed limit, or past the opt-in deadline, on this mirror (a stalled or trickling
    server, in its headers or its body): move on to the next."""


# One raw file at most: twice EMNIST's zip (562 MB), the largest any source here downloads. A mirror that streams
# without a Content-Length (or with a false one) is cut there instead of filling the disk.
MAX_FILE_BYTES = 1 << 30


def _copy_stream(src, out: BinaryIO, name: str, total: Optional[int], progress: Optional[Progress],
                 digest: Digest, deadline: float = float("inf"), watchdog: Optional[Watchdog] = None) -> None:
    done = 0
    if total is not None and total > MAX_FILE_BYTES:
        raise _Permanent(f"announces {total:,} bytes, more than the {MAX_FILE_BYTES:,} a raw file may have")
    # read1: whatever one recv brings (a buffered read(n) would wait for all n bytes, past the deadline)
    while block := src.read1(1 << 16):
        if time.monotonic() > deadline:
            raise _TooSlow(f"deadline passed after {done} bytes (runtime.download.deadline_s)")
        if done + len(block) > MAX_FILE_BYTES:
            raise _Permanent(f"sent more than the {MAX_FILE_BYTES:,} bytes a raw file may have; cut there")
        out.write(block)
        digest.update(block)
        done += len(block)
        if watchdog is not None:
            watchdog.count = done
        if progress:
            progress(name, done, total)
    if total is not None and done != total:
        raise _Transient(f"short read: {done} of {total} bytes")


def _fetch_once(mirror: str, name: str, out: BinaryIO, timeout: float, progress: Optional[Progress],
                digest: Digest, deadline: float = float("inf"), speed: tuple[float, float] = (0, 30.0)) -> None:
    """Copy one file from one mirror into `out` before `deadline` (time.monotonic())."""
    if not _is_url(mirror):
        src_path = Path(mirror).expanduser() / name
        if not src_path.is_file():
            raise _Permanent(f"{src_path} does not exist")
        with open(src_path, "rb") as src:
            _copy_stream(src, out, name, src_path.stat().st_size, progress, digest, deadline)
        return
    base, auth = without_credentials(mirror)
    url = urllib.parse.urljoin(base if base.endswith("/") else base + "/", name)
    req = urllib.request.Request(url, headers={"User-Agent": "imgclf-download/1", **auth})
    with Watchdog(speed[0], speed[1], deadline) as watchdog:
        try:
            # `timeout` bounds connecting and each socket read; the watchdog bounds the rate (headers too).
            with watched_opener(watchdog).open(req, timeout=min(timeout, max(deadline - time.monotonic(), 0.1))) as resp:
                length = resp.headers.get("Content-Length")
                _copy_stream(resp, out, name, int(length) if length else None, progress, digest, deadline, watchdog)
        except urllib.error.HTTPError as exc:
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Transient(f"HTTP {exc.code}") from None
            raise _Permanent(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException,
                _Transient) as exc:
            if watchdog.reason:
                raise _TooSlow(watchdog.reason) from None
            reason = getattr(exc, "reason", exc)
            raise _Transient(f"{type(exc).__name__}: {reason}") from None
        if watchdog.reason:  # cut between the last read and the end: the copy may be short
            raise _TooSlow(watchdog.reason)


def fetch_file(
    spec: RawFile,
    dest_dir: Path,
    mirrors: list[str],
    *,
    retries: int = 3,
    timeout: float = 30.0,
    deadline_s: Optional[float] = None,
    backoff_s: float = 1.0,
    speed_limit_bps: float = 1024.0,
    speed_time_s: float = 30.0,
    log: Log = lambda _: None,
    progress: Optional[Progress] = None,
) -> FetchResult:
    """Put a verified copy of `spec` in `dest_dir`, trying each mirror `retries` times."""
    name = spec.name
    target = dest_dir / name
    if target.is_file() and verify_file(target, spec) is None:
        return FetchResult(name, target, None, target.stat().st_size, 0.0)
    failures: list[str] = []
    for i, mirror in enumerate(mirrors):
        then = "trying the next mirror" if i + 1 < len(mirrors) else "no mirror left"
        shown = redact(mirror)  # a mirror's password never reaches a log line, an error or the summary
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        for attempt in range(1, retries + 1):
            start = time.perf_counter()
            try:
                with atomic_file(target) as out:
                    digest = Digest(bool(spec.sha256))
                    _fetch_once(mirror, name, out, timeout, progress, digest, deadline,
                                (speed_limit_bps, speed_time_s))
                    if why := digest.verdict(spec):
                        raise _Permanent(why)
                return FetchResult(name, target, shown, target.stat().st_size, time.perf_counter() - start)
            except (_Permanent, _TooSlow) as exc:
                failures.append(f"{shown}: {exc}")
                log(f"{name}: {shown}: {exc}; {then}")
                break
            except _Transient as exc:
                failures.append(f"{shown} (try {attempt}/{retries}): {exc}")
                if attempt < retries:
                    delay = backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                    log(f"{name}: {shown}: {exc}; retrying in {delay:.1f}s")
                    time.sleep(delay)
                else:
                    log(f"{name}: {shown}: {exc}; giving up on this mirror, {then}")
    raise DownloadError(f"{name}: no mirror gave a verified copy ({'; '.join(failures) or 'no mirrors'})")


def download_files(
    dest_dir: str | Path,
    files: list[RawFile],
    mirrors: list[str],
    *,
    retries: int = 3,
    timeout: float = 30.0,
    deadline_s: Optional[float] = None,
    backoff_s: float = 1.0,
    speed_limit_bps: float = 1024.0,
    speed_time_s: float = 30.0,
    log: Log = lambda _: None,
    progress: Optional[Progress] = None,
) -> list[FetchResult]:
    """Fetch every file into `dest_dir`; files already present and verified are kept."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    return [
        fetch_file(spec, dest_dir, mirrors, retries=retries, timeout=timeout, deadline_s=deadline_s,
                   backoff_s=backoff_s, speed_limit_bps=speed_limit_bps, speed_time_s=speed_time_s, log=log,
                   progress=progress)
        for spec in files
    ]
