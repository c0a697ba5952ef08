"""One Prefect task per stage. Retries, caching and timeouts live here; the work lives in imgclf.stages.

Tasks hand each other paths and small JSON records, never tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from imgclf.config import Config
from imgclf.files import read_json_file, sha256_file, tree_digest
from imgclf.layout import Layout
from imgclf.stages.download import download_stage
from imgclf.stages.evaluate import evaluate_stage
from imgclf.stages.prepare import prepare_stage
from imgclf.stages.register import register_stage
from imgclf.stages.sweep import sweep_stage
from imgclf.stages.train import train_stage
from imgclf.sweep.trial import run_trial


def library_logs(fn):
    """While a task runs, the library's log lines (per-epoch progress among them) also go to its Prefect run.

    Prefect wires PREFECT_LOGGING_EXTRA_LOGGERS when it is first imported, which in a worker's flow-run
    process is before any flow code runs, so the setting cannot be made from here; the handlers it would
    have added are added for the task's duration only (outside a run they would warn on every line).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        library = logging.getLogger("imgclf")
        added = [h for h in logging.getLogger("prefect.extra").handlers if h not in library.handlers]
        level = library.level
        for handler in added:
            library.addHandler(handler)
        library.setLevel(min(library.getEffectiveLevel(), logging.INFO))
        try:
            return fn(*args, **kwargs)
        finally:
            for handler in added:
                library.removeHandler(handler)
            library.setLevel(level)

    return run


@task(name="download", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
@library_logs
def download(cfg: Config, mirrors: Optional[list[str]] = None) -> dict:
    return download_stage(cfg, mirrors)


def prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """The inputs of prepare: raw-data content and the data section (all of it decides prepare's output)."""
    cfg: Config = parameters["cfg"]
    raw = Layout.of(cfg).raw_root / cfg.data.source
    parts = [json.dumps(cfg.prepare_inputs(), sort_keys=True), tree_digest(raw) if raw.is_dir() else "no-raw"]
    return "prepare-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def processed_intact(cfg: Config) -> bool:
    """The outputs a cached prepare would stand for are still there, byte for byte."""
    layout = Layout.of(cfg)
    if not layout.meta.is_file():
        return False
    recorded = read_json_file(layout.meta).get("sha256", {})
    return bool(recorded) and all((layout.processed / f).is_file() and sha256_file(layout.processed / f) == h
                                  for f, h in recorded.items())


@task(name="prepare", cache_key_fn=prepare_cache_key, persist_result=True)
@library_logs
def prepare(cfg: Config) -> dict:
    return prepare_stage(cfg)


@task(name="train", cache_policy=NO_CACHE)
@library_logs
def train(cfg: Config, extra_tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None,
          parent_run_id: Optional[str] = None) -> dict:
    # Not Prefect's timeout_seconds: in a worker thread it cannot stop a sync function, and in the main
    # thread its alarm can land anywhere (mid-import, mid-write). The loop's deadline stops between batches.
    timeout = cfg.runtime.orchestration.train_timeout_s
    return train_stage(cfg, deadline=time.monotonic() + timeout if timeout else None,
                       extra_tags=extra_tags, run_id=run_id, parent_run_id=parent_run_id)


@task(name="sweep", cache_policy=NO_CACHE)
@library_logs
def sweep(cfg: Config, raw: dict, overrides: dict[str, Any], trials: Optional[int], parallel: Optional[int],
          launcher, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return sweep_stage(cfg, raw, overrides, trials=trials, parallel=parallel, launcher=launcher, tags=extra_tags)


@task(name="sweep-trial", cache_policy=NO_CACHE)
@library_logs
def sweep_trial(spec: dict[str, Any]) -> dict:
    return run_trial(spec)


@task(name="evaluate", cache_policy=NO_CACHE)
@library_logs
def evaluate(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return evaluate_stage(cfg, extra_tags)


@task(name="register", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=3),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
@library_logs
def register(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return register_stage(cfg, extra_tags)
