"""prepare: decode once, split (stratified, seeded), normalization stats, byte-identical on a rerun."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from ..config import Config
from ..data.checks import describe
from ..data.splits import prepare
from ..progress import Progress
from . import holds_outputs, records_in_dvc_lock

log = logging.getLogger("imgclf")


@holds_outputs("prepare")
@records_in_dvc_lock("prepare")
def prepare_stage(cfg: Config, progress: Optional[Progress] = None) -> dict:
    start = time.perf_counter()
    meta = prepare(cfg.data, Path(cfg.paths.raw_dir), Path(cfg.paths.processed_dir), progress)
    log.info("prepared %s: %s", cfg.paths.processed_dir, ", ".join(f"{k} {v}" for k, v in meta["sizes"].items()))
    for check in meta["checks"]:
        if check["status"] == "failed":
            log.warning("data check %s failed (set to warn): %s", check["name"], describe(check))
    log.info("data checks: %s", ", ".join(f"{c['name']} {c['status']}" for c in meta["checks"]))
    fixed = meta.get("corrections")
    if fixed and fixed["rows"]:
        log.info("corrections from %s: %d relabelled, %d dropped", fixed["file"], fixed["relabelled"], fixed["dropped"])
    if fixed and fixed["absent"]:
        log.warning("corrections from %s: %d id(s) are in no split (a quick run's subset, or a typo): %s", fixed["file"],
                    fixed["absent"], ", ".join(fixed["absent_ids"][:5]))
    if meta.get("conversions"):
        log.info("decoding converted images: %s", ", ".join(f"{n} x {what}" for what, n in meta["conversions"].items()))
    return {"processed_dir": cfg.paths.processed_dir, "sizes": meta["sizes"], "conversions": meta.get("conversions", {}),
            "sha256": meta["sha256"],
            "checks": {c["name"]: c["status"] for c in meta["checks"]}, "seconds": round(time.perf_counter() - start, 3)}
