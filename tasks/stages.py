"""One Prefect task per stage. Retries, caching and timeouts live here; the work lives in imgclf.stages.

Tasks hand each other paths and small JSON records, never tensors.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from imgclf import stages
from imgclf.config import Config
from imgclf.files import sha256_file, tree_digest


@task(name="download", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def download(cfg: Config, mirrors: Optional[list[str]] = None) -> dict:
    return stages.download_stage(cfg, mirrors)


def prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """The inputs of prepare: raw-data content and the data params."""
    cfg: Config = parameters["cfg"]
    raw = Path(cfg.data.raw_dir) / cfg.data.source
    parts = [json.dumps(cfg.to_dict()["data"], sort_keys=True), tree_digest(raw) if raw.is_dir() else "no-raw"]
    return "prepare-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def processed_intact(cfg: Config) -> bool:
    """The outputs a cached prepare would stand for are still there, byte for byte."""
    meta = Path(cfg.data.processed_dir) / "meta.json"
    if not meta.is_file():
        return False
    recorded = json.loads(meta.read_text()).get("sha256", {})
    return bool(recorded) and all((meta.parent / f).is_file() and sha256_file(meta.parent / f) == h
                                  for f, h in recorded.items())


@task(name="prepare", cache_key_fn=prepare_cache_key, persist_result=True)
def prepare(cfg: Config) -> dict:
    return stages.prepare_stage(cfg)


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: Config, extra_tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None) -> dict:
    # Not Prefect's timeout_seconds: in a worker thread it cannot stop a sync function, and in the main
    # thread its alarm can land anywhere (mid-import, mid-write). The loop's deadline stops between batches.
    timeout = cfg.orchestration.train_timeout_s
    return stages.train_stage(cfg, deadline=time.monotonic() + timeout if timeout else None,
                              extra_tags=extra_tags, run_id=run_id)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return stages.evaluate_stage(cfg, extra_tags)


@task(name="register", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=3),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
def register(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return stages.register_stage(cfg, extra_tags)
