"""download: the configured data source fetches its raw data (the MNIST family from mirrors, with retries,
deadline and checksums; an ImageFolder as a snapshot); then DVC versions it."""

from __future__ import annotations

import logging
import os
import time
from typing import Optional

from ..config import Config
from ..data import fetch as dl
from ..data.datasource import data_source
from ..layout import Layout
from ..progress import Progress
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
    source = data_source(cfg.data.source)
    record = source.fetch(cfg, raw / source.name, resolve_mirrors(cfg, mirrors), log.info, log.warning, progress)
    record["raw_dir"] = str(raw / source.name)
    if cfg.paths.dvc_file:
        from ..ops.versioning import track_raw

        record["dvc"] = track_raw(cfg.paths.raw_dir, cfg.paths.dvc_file, log=log.info)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record
