"""The low-speed limit: a mirror that stalls or trickles, in its headers or its body, is left within the
limit's window; a slow but moving download is never cut off. A real loopback server that sends by the byte."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from imgclf.data.fetch import DownloadError, download_files

from .helpers import make_mnist_dir

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


class SlowServer:
    """Sends `head` (status line and headers) then `body`, `chunk` bytes every `every` seconds."""

    def __init__(self, head: bytes, body: bytes, chunk: int, every: float, head_at_once: bool = False):
        self.head_at_once = head_at_once
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.stop = threading.Event()
        self.head, self.body, self.chunk, self.every = head, body, chunk, every
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                data = self.head + self.body
                if self.head_at_once:
                    conn.sendall(self.head)
                    data = self.body
                for i in range(0, len(data), self.chunk):
                    if self.stop.is_set():
                        return
                    conn.sendall(data[i: i + self.chunk])
                    time.sleep(self.every)
                self.stop.wait()  # then hold the connection open, silent
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def _head(length: int) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\nX-Padding: {'x' * 200}\r\n"
            "Connection: close\r\n\r\n").encode()


@pytest.fixture
def one_file(tmp_path):
    src = tmp_path / "good"
    specs = make_mnist_dir(src, n_train=20, n_test=10)
    spec = next(s for s in specs if s.name == "train-images-idx3-ubyte.gz")
    return src, spec, (src / spec.name).read_bytes()


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_trickling_mirror_is_left_within_the_window(where, one_file, tmp_path):
    src, spec, data = one_file
    # One byte every 0.1 s: 10 bytes/s, far under 1 KiB/s, but each read comes well inside the read timeout.
    server = SlowServer(_head(len(data)), data, 1, 0.1, head_at_once=where == "body")
    try:
        logs: list[str] = []
        start = time.perf_counter()
        got = download_files(tmp_path / "raw", [spec], [server.url, str(src)], retries=1, timeout=30,
                             backoff_s=0, speed_limit_bps=1024, speed_time_s=2, log=logs.append)
        elapsed = time.perf_counter() - start
        assert got[0].mirror == str(src), logs
        assert elapsed < 6, elapsed
        assert any("under 1024 bytes/s for 2s" in m and "trying the next mirror" in m for m in logs), logs
    finally:
        server.close()


def test_a_stalled_mirror_fails_in_one_window_with_no_deadline(one_file, tmp_path):
    src, spec, data = one_file
    server = SlowServer(b"HTTP/1.1 200 OK\r\n", b"", 1, 0.1)  # then silence, the connection held open
    try:
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="under 1024 bytes/s"):
            download_files(tmp_path / "raw", [spec], [server.url], retries=1, timeout=60, backoff_s=0,
                           speed_limit_bps=1024, speed_time_s=2)
        assert time.perf_counter() - start < 6
        assert not list((tmp_path / "raw").iterdir())  # nothing half-written
    finally:
        server.close()


def test_a_slow_but_moving_download_is_not_cut_off(tmp_path):
    """4 KiB/s for 4 s against a 1 KiB/s limit over 1 s: slow, never under the limit, so it completes."""
    import hashlib

    from imgclf.data.sources import RawFile

    data = bytes(range(256)) * 64  # 16 KiB
    server = SlowServer(_head(len(data)), data, 512, 0.125)
    try:
        spec = RawFile("blob.bin", hashlib.md5(data).hexdigest())
        start = time.perf_counter()
        got = download_files(tmp_path / "raw", [spec], [server.url], retries=1, timeout=30, backoff_s=0,
                             speed_limit_bps=1024, speed_time_s=1)
        assert got[0].bytes == len(data) and time.perf_counter() - start > 3
    finally:
        server.close()


@pytest.mark.parametrize("announced", [False, True])
def test_a_mirror_that_sends_too_much_is_cut_off(announced, one_file, tmp_path, monkeypatch):
    """Without a Content-Length (or announcing more than a raw file may have), a mirror cannot fill the disk:
    the copy stops at the cap (lowered here to 1 MiB), nothing is left, the next mirror is tried."""
    from imgclf.data import fetch

    monkeypatch.setattr(fetch, "MAX_FILE_BYTES", 1 << 20)
    src, spec, data = one_file
    endless = bytes(5 << 20)
    head = _head(len(endless)) if announced else b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    server = SlowServer(head, endless, 1 << 16, 0.0, head_at_once=True)
    try:
        logs: list[str] = []
        got = download_files(tmp_path / "raw", [spec], [server.url, str(src)], retries=1, backoff_s=0, log=logs.append)
        assert got[0].mirror == str(src)
        assert any("1,048,576" in m and "trying the next mirror" in m for m in logs), logs
    finally:
        server.close()
