"""Checksums of the MNIST family's files: the published archive's MD5, or the SHA-256 of its content."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Optional

from .sources import RawFile


class Digest:
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
    digest = Digest(bool(spec.sha256))
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.verdict(spec)
