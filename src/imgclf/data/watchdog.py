"""A low-speed limit for one HTTP transfer (curl's --speed-limit/--speed-time), headers included."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.request
from typing import Optional


class Watchdog:
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

    def __enter__(self) -> "Watchdog":
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
                self.reason = f"deadline passed after {count} bytes (runtime.download.deadline_s)"
            elif self.limit > 0 and now - marks[0][0] >= self.window and count - marks[0][1] < self.limit * self.window:
                self.reason = (f"under {self.limit:g} bytes/s for {self.window:g}s after {count} bytes "
                               "(runtime.download.speed_limit_bps / runtime.download.speed_time_s)")
            if self.reason:
                self._cut()
                return


def watched_opener(watchdog: Watchdog) -> urllib.request.OpenerDirector:
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
