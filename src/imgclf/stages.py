"""One function per pipeline stage, shared by the CLI (and so dvc.yaml) and the Prefect tasks.

Each takes the validated Config and a logger, does its I/O, and returns a small
JSON-able record; nothing here imports an orchestrator.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from . import download as dl
from .config import Config
from .imagefolder import snapshot
from .prepare import prepare

log = logging.getLogger("imgclf")


def resolve_mirrors(cfg: Config, mirrors: Optional[list[str]] = None) -> list[str]:
    """Explicit mirrors win, then $IMGCLF_MIRROR (comma-separated), then params."""
    if mirrors:
        return list(mirrors)
    env = os.environ.get(dl.MIRROR_ENV, "").strip()
    if env:
        return [m.strip() for m in env.split(",") if m.strip()]
    return list(cfg.data.mirrors)


def download_stage(cfg: Config, mirrors: Optional[list[str]] = None,
                   progress: Optional[dl.Progress] = None) -> dict:
    start = time.perf_counter()
    raw = Path(cfg.data.raw_dir)
    if cfg.data.source == "mnist":
        chosen = resolve_mirrors(cfg, mirrors)
        results = dl.download_mnist(
            raw / "mnist", chosen, retries=cfg.data.download_retries, timeout=cfg.data.download_timeout_s,
            backoff_s=cfg.data.download_backoff_s, log=log.warning, progress=progress,
        )
        for r in results:
            how = "already present, verified" if r.mirror is None else f"from {r.mirror}"
            log.info("%s: %d bytes %s", r.name, r.bytes, how)
        record = {"source": "mnist", "files": [r.name for r in results],
                  "fetched": [r.name for r in results if r.mirror is not None]}
    else:
        found = snapshot(cfg.data.path, raw / "imagefolder", log=log.warning)
        log.info("snapshot of %s: %d images in %d classes, %d skipped",
                 cfg.data.path, found.count, len(found.classes), len(found.skipped))
        record = {"source": "imagefolder", "classes": found.classes, "images": found.count,
                  "skipped": len(found.skipped)}
    record["raw_dir"] = str(raw / cfg.data.source)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def prepare_stage(cfg: Config, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    start = time.perf_counter()
    meta = prepare(cfg.data, progress)
    log.info("prepared %s: %s", cfg.data.processed_dir,
             ", ".join(f"{k} {v}" for k, v in meta["sizes"].items()))
    return {"processed_dir": cfg.data.processed_dir, "sizes": meta["sizes"],
            "sha256": meta["sha256"], "seconds": round(time.perf_counter() - start, 3)}
