"""download: fetch a data set of the MNIST family (mirrors, retries, deadline, checksums) or snapshot an
ImageFolder; version it with DVC."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from .. import download as dl
from ..config import Config
from ..datasets import download_source
from ..layout import Layout
from ..progress import Progress
from ..snapshot import snapshot
from ..sources import IMAGEFOLDER, idx_source
from . import holds_outputs

log = logging.getLogger("imgclf")


def resolve_mirrors(cfg: Config, mirrors: Optional[list[str]] = None) -> list[str]:
    """Explicit mirrors win, then $IMGCLF_MIRROR (comma-separated), then params."""
    if mirrors:
        return list(mirrors)
    env = os.environ.get(dl.MIRROR_ENV, "").strip()
    if env:
        return [m.strip() for m in env.split(",") if m.strip()]
    return cfg.mirrors


@holds_outputs("download")
def download_stage(cfg: Config, mirrors: Optional[list[str]] = None, progress: Optional[Progress] = None) -> dict:
    start = time.perf_counter()
    raw = Layout.of(cfg).raw_root
    if cfg.data.source == IMAGEFOLDER:
        found = snapshot(cfg.data.path, raw / IMAGEFOLDER, log=log.warning, link=cfg.runtime.link,
                         classes=cfg.data.classes)
        log.info("snapshot of %s: %d images in %d classes, %d skipped; files %s", cfg.data.path, found.count,
                 len(found.classes), len(found.skipped), ", ".join(f"{k} {v}" for k, v in sorted(found.placed.items())))
        record = {"source": IMAGEFOLDER, "classes": found.classes, "images": found.count,
                  "skipped": len(found.skipped), "placed": found.placed}
    else:
        results = download_source(
            raw / cfg.data.source, idx_source(cfg.data.source), resolve_mirrors(cfg, mirrors),
            retries=cfg.runtime.download.retries, timeout=cfg.runtime.download.timeout_s,
            deadline_s=cfg.runtime.download.deadline_s, backoff_s=cfg.runtime.download.backoff_s,
            speed_limit_bps=cfg.runtime.download.speed_limit_bps, speed_time_s=cfg.runtime.download.speed_time_s,
            log=log.warning,
            progress=progress,
        )
        for r in results:
            how = "already present, verified" if r.mirror is None else f"from {r.mirror}"
            log.info("%s: %d bytes %s", r.name, r.bytes, how)
        record = {"source": cfg.data.source, "files": [r.name for r in results],
                  "fetched": [r.name for r in results if r.mirror is not None]}
    record["raw_dir"] = str(raw / cfg.data.source)
    if cfg.paths.dvc_file:
        from ..versioning import track_raw

        record["dvc"] = track_raw(cfg.paths.raw_dir, cfg.paths.dvc_file, log=log.info)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record
