"""One Prefect task per stage. Retries, caching and timeouts live here; the work lives in imgclf.stages.

Tasks hand each other paths and small JSON records, never tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from imgclf.config import Config
from imgclf.console import quiet_libraries
from imgclf.data.datasource import data_source
from imgclf.files import read_json_file, sha256_file, tree_digest
from imgclf.layout import Layout
from imgclf.stages.audit import audit_stage
from imgclf.stages.download import download_stage
from imgclf.stages.evaluate import evaluate_stage
from imgclf.stages.predict_batch import predict_batch_stage
from imgclf.stages.prepare import prepare_stage
from imgclf.stages.register import register_stage
from imgclf.stages.train import train_stage
from imgclf.sweep.stage import sweep_stage
from imgclf.sweep.trial import run_trial

from . import events


def library_logs(fn):
    """While a task runs, the library's log lines (per-epoch progress among them) also go to its Prefect run.

    Prefect wires PREFECT_LOGGING_EXTRA_LOGGERS when it is first imported, which in a worker's flow-run
    process is before any flow code runs, so the setting cannot be made from here; the handlers it would
    have added are added for the task's duration only (outside a run they would warn on every line).
    """
    @functools.wraps(fn)
    def run(*args, **kwargs):
        quiet_libraries()
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


def raw_data_hash(cfg: Config) -> Optional[str]:
    """DVC's md5 of the raw data when DVC versions it, else a digest of the files; None before any download."""
    from imgclf.tracking.lineage import dvc_data_hash

    if cfg.paths.dvc_file and Path(cfg.paths.dvc_file).is_file():
        found = dvc_data_hash(cfg.paths.dvc_file)
        if found and found != "none":
            return found
    raw = Layout.of(cfg).raw_root / data_source(cfg.data.source).name
    return tree_digest(raw) if raw.is_dir() else None


@task(name="download", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
@library_logs
def download(cfg: Config, mirrors: Optional[list[str]] = None) -> dict:
    """Download, then emit imgclf.data.changed when the raw data's hash moved (the retrain trigger)."""
    before = raw_data_hash(cfg)
    record = download_stage(cfg, mirrors)
    after = raw_data_hash(cfg)
    if after != before:
        record["event_id"] = events.emit(events.DATA_CHANGED, f"imgclf.data.{cfg.data.source}",
                                         {"imgclf.source": cfg.data.source},
                                         {"before": before, "after": after, "raw_dir": record.get("raw_dir")})
        logging.getLogger("imgclf").info("raw data changed (%s -> %s): event %s emitted", before, after,
                                         events.DATA_CHANGED)
    return record


def prepare_cache_key(context, parameters: dict[str, Any]) -> str:
    """The inputs of prepare: raw-data content, the data section (all of it decides prepare's output) and the
    corrections file's content."""
    cfg: Config = parameters["cfg"]
    raw = Layout.of(cfg).raw_root / cfg.data.source
    parts = [json.dumps(cfg.prepare_inputs(), sort_keys=True), tree_digest(raw) if raw.is_dir() else "no-raw",
             _corrections_digest(cfg) or "no-corrections"]
    return "prepare-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _corrections_digest(cfg: Config) -> Optional[str]:
    path = Path(cfg.data.corrections) if cfg.data.corrections else None
    return sha256_file(path) if path is not None and path.is_file() else None


def processed_intact(cfg: Config) -> bool:
    """The outputs a cached prepare would stand for are there, byte for byte: made from these data params and
    this raw data. Intact files alone are not enough: after runs with val_fraction 0.25, then 0.2, a third with
    0.25 finds 0.25's record in the cache while the folder holds 0.2's splits, intact."""
    layout = Layout.of(cfg)
    if not layout.meta.is_file():
        return False
    meta = read_json_file(layout.meta)
    raw = layout.raw_root / cfg.data.source
    if meta.get("params") != json.loads(json.dumps(cfg.prepare_inputs())) or not raw.is_dir() \
            or meta.get("raw_sha256") != tree_digest(raw) \
            or (meta.get("corrections") or {}).get("sha256") != _corrections_digest(cfg):
        return False
    recorded = meta.get("sha256", {})
    return bool(recorded) and all((layout.processed / f).is_file() and sha256_file(layout.processed / f) == h
                                  for f, h in recorded.items())


def cached_record_is_json(cfg: Config) -> bool:
    """Prefect decodes a cached result with the serializer its record names, whatever the task says, and its
    JSON decoder imports any class a `{"__class__": ...}` object names. So the record is read here first, with
    plain `json`: it must name Prefect's JSON serializer with no options, and its payload must hold plain values
    only. Anything else (pickle, another decoder, an object tag anywhere) is never handed to Prefect."""
    from prefect.settings import get_current_settings

    path = Path(get_current_settings().results.local_storage_path).expanduser() / prepare_cache_key(None, {"cfg": cfg})
    if not path.exists():
        return True
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        serializer = record["metadata"]["serializer"]
        ok = (serializer.get("type") == "json" and serializer.get("jsonlib", "json") == "json"
              and serializer.get("object_decoder") == JSON_DECODER
              and not serializer.get("loads_kwargs") and not serializer.get("dumps_kwargs")
              and isinstance(record["result"], str) and _plain(json.loads(record["result"])))
    except (ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError):
        ok = False
    if not ok:
        logging.getLogger("imgclf").warning("%s: not a plain JSON result record of this project; prepare runs "
                                            "again and replaces it", path)
    return ok


def _plain(value: Any) -> bool:
    """Only what prepare returns: dicts without Prefect's object tags, lists, strings, numbers, bools, null."""
    if isinstance(value, dict):
        return (not {"__class__", "__exc_type__"} & value.keys()) and all(_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


JSON_DECODER = "prefect.serializers.prefect_json_object_decoder"


# JSON, not Prefect's default pickle: a cached result is read back by a later run, and a pickle from the
# result store would run code on load (the store is a folder others can write to).
@task(name="prepare", cache_key_fn=prepare_cache_key, persist_result=True, result_serializer="json")
@library_logs
def prepare(cfg: Config) -> dict:
    return prepare_stage(cfg)


def prepare_cached(cfg: Config) -> dict:
    """prepare, its cached result used only while the outputs it stands for are intact and its record is JSON."""
    fresh = processed_intact(cfg) and cached_record_is_json(cfg)
    return prepare.with_options(refresh_cache=not fresh)(cfg)


@task(name="train", cache_policy=NO_CACHE)
@library_logs
def train(cfg: Config, extra_tags: Optional[dict[str, str]] = None, run_id: Optional[str] = None,
          parent_run_id: Optional[str] = None, resume: bool = False, checkpoint_to_run: bool = False) -> dict:
    # Not Prefect's timeout_seconds: in a worker thread it cannot stop a sync function, and in the main
    # thread its alarm can land anywhere (mid-import, mid-write). The loop's deadline stops between batches.
    timeout = cfg.runtime.orchestration.train_timeout_s
    return train_stage(cfg, resume=resume, deadline=time.monotonic() + timeout if timeout else None,
                       extra_tags=extra_tags, run_id=run_id, parent_run_id=parent_run_id,
                       checkpoint_to_run=checkpoint_to_run)


@task(name="sweep", cache_policy=NO_CACHE)
@library_logs
def sweep(cfg: Config, raw: dict, overrides: dict[str, Any], trials: Optional[int], parallel: Optional[int],
          launcher, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return sweep_stage(cfg, raw, overrides, trials=trials, parallel=parallel, launcher=launcher, tags=extra_tags)


@task(name="sweep-trial", cache_policy=NO_CACHE)
@library_logs
def sweep_trial(spec: dict[str, Any]) -> dict:
    return run_trial(spec)


@task(name="audit", cache_policy=NO_CACHE)
@library_logs
def audit(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return audit_stage(cfg, extra_tags)


@task(name="evaluate", cache_policy=NO_CACHE)
@library_logs
def evaluate(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    return evaluate_stage(cfg, extra_tags)


@task(name="register", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=3),
      retry_jitter_factor=0.5, cache_policy=NO_CACHE)
@library_logs
def register(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    record = register_stage(cfg, extra_tags)
    if record.get("promoted"):
        record["event_id"] = events.emit(events.MODEL_PROMOTED, f"imgclf.model.{record['model']}",
                                         {"imgclf.model": record["model"], "imgclf.version": str(record["version"])},
                                         {k: record.get(k) for k in ("model", "version", "reason", "run_id",
                                                                     "challenger_score", "previous_production_score")})
    return record


@task(name="predict-batch", cache_policy=NO_CACHE)
@library_logs
def predict_batch(cfg: Config, source: str, model_uri: Optional[str] = None, out: Optional[str] = None,
                  extra_tags: Optional[dict[str, str]] = None, settle_s: float = 0.0) -> dict:
    return predict_batch_stage(cfg, source, model_uri, out, extra_tags=extra_tags, settle_s=settle_s)
