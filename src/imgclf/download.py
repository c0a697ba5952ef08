"""Downloads for the MNIST family: mirrors, retries with backoff, checksums, atomic writes."""

from __future__ import annotations

import hashlib
import http.client
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from .files import atomic_file
from .progress import Progress
from .sources import RawFile

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


class _Watchdog:
    """curl's --speed-limit/--speed-time for one transfer, headers included: a thread that shuts the
    connection's socket when fewer than `limit` bytes/s came in over the last `window` seconds, or when
    the deadline passes. A per-read timeout alone lets a server that sends a byte a second hold on forever,
    and a slow but moving large download (EMNIST's 0.5 GB) must never be cut off."""

    def __init__(self, limit: float, window: float, deadline: float):
        self.limit, self.window, self.deadline = limit, window, deadline
        self.count = 0  # body bytes so far; headers count as none, so stalled headers trip it too
        self.reason: Optional[str] = None
        self._sock: Optional[socket.socket] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="imgclf-download-watchdog")

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def attach(self, sock: socket.socket) -> None:
        self._sock = sock
        if self.reason:
            self._cut()

    def _cut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _watch(self) -> None:
        marks = [(time.monotonic(), 0)]
        tick = min(0.5, self.window / 4)
        while not self._done.wait(tick):
            now, count = time.monotonic(), self.count
            marks.append((now, count))
            while len(marks) > 1 and marks[1][0] <= now - self.window:
                marks.pop(0)
            if now > self.deadline:
                self.reason = f"deadline passed after {count} bytes (data.download_deadline_s)"
            elif self.limit > 0 and now - marks[0][0] >= self.window and count - marks[0][1] < self.limit * self.window:
                self.reason = (f"under {self.limit:g} bytes/s for {self.window:g}s after {count} bytes "
                               "(data.download_speed_limit_bps / data.download_speed_time_s)")
            if self.reason:
                self._cut()
                return


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener whose connections hand their socket to the watchdog as soon as they connect."""

    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                watchdog.attach(self.sock)
        return Connection

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(Http, Https)


class _Digest:
    """MD5 of the bytes as they come, and SHA-256 of their gzip-decompressed content when asked."""

    def __init__(self, content: bool):
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.content = hashlib.sha256() if content else None
        self._gunzip = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self.broken = False

    def update(self, block: bytes) -> None:
        self.md5.update(block)
        if self.content is None or self.broken:
            return
        try:
            while block:
                self.content.update(self._gunzip.decompress(block))
                block = self._gunzip.unused_data  # the next member of a multi-member gzip
                if block:
                    self._gunzip = zlib.decompressobj(zlib.MAX_WBITS | 16)
        except zlib.error:
            self.broken = True

    def verdict(self, spec: RawFile) -> Optional[str]:
        """None when the file is the published one (or the same content re-compressed), else why not."""
        got = self.md5.hexdigest()
        if got == spec.md5:
            return None
        if spec.sha256 and self.content is not None and not self.broken and self._gunzip.eof:
            content = self.content.hexdigest()
            if content == spec.sha256:
                return None
            return f"checksum mismatch: MD5 {got} (expected {spec.md5}), content SHA-256 {content}"
        return f"MD5 mismatch: got {got}, expected {spec.md5}"


def verify_file(path: Path, spec: RawFile) -> Optional[str]:
    digest = _Digest(bool(spec.sha256))
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.verdict(spec)


def _copy_stream(src, out: BinaryIO, name: str, total: Optional[int], progress: Optional[Progress],
                 digest: _Digest, deadline: float = float("inf"), watchdog: Optional[_Watchdog] = None) -> None:
    done = 0
    # read1: whatever one recv brings (a buffered read(n) would wait for all n bytes, past the deadline)
    while block := src.read1(1 << 16):
        if time.monotonic() > deadline:
            raise _TooSlow(f"deadline passed after {done} bytes (data.download_deadline_s)")
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
                digest: _Digest, deadline: float = float("inf"), speed: tuple[float, float] = (0, 30.0)) -> None:
    """Copy one file from one mirror into `out` before `deadline` (time.monotonic())."""
    if not _is_url(mirror):
        src_path = Path(mirror).expanduser() / name
        if not src_path.is_file():
            raise _Permanent(f"{src_path} does not exist")
        with open(src_path, "rb") as src:
            _copy_stream(src, out, name, src_path.stat().st_size, progress, digest, deadline)
        return
    url = urllib.parse.urljoin(mirror if mirror.endswith("/") else mirror + "/", name)
    req = urllib.request.Request(url, headers={"User-Agent": "imgclf-download/1"})
    with _Watchdog(speed[0], speed[1], deadline) as watchdog:
        try:
            # `timeout` bounds connecting and each socket read; the watchdog bounds the rate (headers too).
            with _opener(watchdog).open(req, timeout=min(timeout, max(deadline - time.monotonic(), 0.1))) as resp:
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
        deadline = time.monotonic() + deadline_s if deadline_s else float("inf")
        for attempt in range(1, retries + 1):
            start = time.perf_counter()
            try:
                with atomic_file(target) as out:
                    digest = _Digest(bool(spec.sha256))
                    _fetch_once(mirror, name, out, timeout, progress, digest, deadline,
                                (speed_limit_bps, speed_time_s))
                    if why := digest.verdict(spec):
                        raise _Permanent(why)
                return FetchResult(name, target, mirror, target.stat().st_size, time.perf_counter() - start)
            except (_Permanent, _TooSlow) as exc:
                failures.append(f"{mirror}: {exc}")
                log(f"{name}: {mirror}: {exc}; {then}")
                break
            except _Transient as exc:
                failures.append(f"{mirror} (try {attempt}/{retries}): {exc}")
                if attempt < retries:
                    delay = backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
                    log(f"{name}: {mirror}: {exc}; retrying in {delay:.1f}s")
                    time.sleep(delay)
                else:
                    log(f"{name}: {mirror}: {exc}; giving up on this mirror, {then}")
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
