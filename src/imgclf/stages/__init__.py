"""One module per pipeline stage, each one function shared by the CLI (and so dvc.yaml) and the Prefect tasks.

Each stage takes the validated Config, does its I/O at the edges, and returns a small
JSON-able record with the stage's wall time as `seconds`. Nothing here imports an orchestrator.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

from ..config import Config
from ..layout import Layout
from ..locks import exclusive_folders

log = logging.getLogger("imgclf")
RECORDED = ("prepare", "audit", "train", "evaluate", "register")  # the dvc.yaml stages (download: data.dvc)


def holds_outputs(stage: str) -> Callable:
    """Run the stage while holding its output folders exclusively (see locks.exclusive_folders).

    The decorated function gains `wait=False`: wait for another writer instead of failing at once.
    Under torchrun only rank 0 writes, so only rank 0 takes the lock.
    """

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(cfg: Config, *args, wait: bool = False, **kwargs):
            if os.environ.get("RANK", "0") != "0":
                return func(cfg, *args, **kwargs)
            with exclusive_folders(Layout.of(cfg).writes(stage), stage, wait):
                return func(cfg, *args, **kwargs)

        return wrapper

    return decorate


def records_in_dvc_lock(stage: str) -> Callable:
    """After the stage ran well outside `dvc repro` (the CLI, scripts/pipeline, the Prefect flow), record it in
    dvc.lock as DVC would, so `dvc status` agrees and `dvc repro` does not rerun it (ops.versioning.record_stage
    says why when it cannot). Goes under @holds_outputs, so the outputs it hashes are still the stage's own."""
    assert stage in RECORDED, stage

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(cfg: Config, *args, **kwargs):
            result = func(cfg, *args, **kwargs)
            # Under `dvc repro` (DVC_STAGE set) DVC records the stage itself, and imports nothing more here.
            if os.environ.get("RANK", "0") == "0" and not os.environ.get("DVC_STAGE") and os.path.isdir(".dvc"):
                from ..ops.versioning import record_stage

                if record_stage(cfg, stage, log=log.warning):
                    log.info("dvc.lock: %s recorded (dvc status agrees; dvc repro will not rerun it)", stage)
            return result

        return wrapper

    return decorate
