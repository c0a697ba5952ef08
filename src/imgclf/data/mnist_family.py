"""A data set of the MNIST family into data/raw: its files from the mirrors, or, for EMNIST, the
members of its verified zip (which is removed once they are out)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..files import sha256_file, write_bytes
from .fetch import DownloadError, FetchResult, download_files
from .sources import IdxSource

MEMBER_SUMS = "SHA256SUMS"  # what was taken out of a verified archive, to check it by on later runs


def _members_intact(dest_dir: Path, names: list[str]) -> bool:
    sums = dest_dir / MEMBER_SUMS
    if not sums.is_file():
        return False
    recorded = dict(reversed(line.split(maxsplit=1)) for line in sums.read_text().splitlines() if line.strip())
    return all(n in recorded and (dest_dir / n).is_file() and sha256_file(dest_dir / n) == recorded[n]
               for n in names)


def download_source(dest_dir: str | Path, source: IdxSource, mirrors: list[str], **kw) -> list[FetchResult]:
    """A data set of the MNIST family into `dest_dir`. For a zipped one (EMNIST) the archive is fetched
    and verified beside it, its members for this split taken out, and the archive removed."""
    dest_dir = Path(dest_dir)
    if source.archive is None:
        return download_files(dest_dir, list(source.files), mirrors, **kw)
    names = [f.name for f in source.files]
    if _members_intact(dest_dir, names):
        return [FetchResult(n, dest_dir / n, None, (dest_dir / n).stat().st_size, 0.0) for n in names]
    # Beside data/raw, not in it: the 0.5 GB zip must not end up in DVC's snapshot of the raw data.
    cache = dest_dir.parent.parent / f".{dest_dir.parent.name}-archives"
    (got,) = download_files(cache, [source.archive], mirrors, **kw)
    results = []
    try:
        with zipfile.ZipFile(got.path) as zf:
            members = {Path(m).name: m for m in zf.namelist()}
            for n in names:
                if n not in members:
                    raise DownloadError(f"{got.path}: has no member {n}")
                write_bytes(dest_dir / n, zf.read(members[n]))  # zipfile checks each member's CRC
                results.append(FetchResult(n, dest_dir / n, got.mirror or str(got.path), (dest_dir / n).stat().st_size,
                                           got.seconds))
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{got.path}: not a readable zip ({exc})") from None
    write_bytes(dest_dir / MEMBER_SUMS, "".join(f"{sha256_file(dest_dir / n)}  {n}\n" for n in names).encode())
    got.path.unlink()
    return results
