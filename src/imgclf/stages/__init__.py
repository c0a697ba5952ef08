"""One module per pipeline stage, each one function shared by the CLI (and so dvc.yaml) and the Prefect tasks.

Each stage takes the validated Config, does its I/O at the edges, and returns a small
JSON-able record with the stage's wall time as `seconds`. Nothing here imports an orchestrator.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

from ..config import Config
from ..files import exclusive_folders
from ..layout import Layout


def holds_outputs(stage: str) -> Callable:
    """Run the stage while holding its output folders exclusively (see files.exclusive_folders).

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
