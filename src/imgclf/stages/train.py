"""train: the configured model on the prepared splits, tracked in one MLflow run, outputs written atomically."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import Config
from ..layout import Layout
from ..progress import Progress
from . import holds_outputs, records_in_dvc_lock

log = logging.getLogger("imgclf")
SCORES = ("epochs_run", "kept_epoch", "kept_val_acc", "kept_val_loss", "train_seconds")  # metrics/train_scores.json


@dataclass(frozen=True)
class TrialControl:
    """What a sweep changes about one training: a seeded subset of the train split, a rule that may stop it
    after any epoch (the pruner), and no resumable checkpoint (a crashed trial is retried from scratch)."""

    subset: Optional[int] = None
    stop: Optional[Callable[[dict[str, Any]], Optional[str]]] = None


@holds_outputs("train")
@records_in_dvc_lock("train")
def train_stage(cfg: Config, resume: bool = False, on_batch: Optional[Progress] = None,
                deadline: Optional[float] = None, extra_tags: Optional[dict[str, str]] = None,
                run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                trial: Optional[TrialControl] = None, checkpoint_to_run: bool = False) -> dict:
    """Train the configured model on the prepared splits; write the best weights and metrics.

    With tracking on, a new MLflow run is opened (before any training, so an unreachable
    server fails fast), params, lineage and per-epoch metrics go to it, and its id is
    written to run.json for the later stages. `run_id` reuses a run made beforehand
    (remote training: the pipeline made it and shipped the inputs as its artifacts).
    `checkpoint_to_run`: every epoch's checkpoint also goes to the run's artifacts (a worker that may die).
    """
    import torch

    from ..models.classifier import parameter_count
    from ..training.checkpoint import Checkpointing
    from ..training.loop import Hooks, fit
    from ..training.runtime import distributed, resolve_device, set_threads

    start = time.perf_counter()
    layout = Layout.of(cfg)
    with distributed(cfg.runtime.device) as dist:
        threads = set_threads(cfg.runtime.threads, dist.world)
        device = resolve_device(cfg.runtime.device, dist.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        train, val, meta, streaming = _load_data(cfg, layout, device, dist, trial.subset if trial else None)
        model, arch = _build_model(cfg, meta, device)
        n_params = parameter_count(model)
        if dist.is_main:
            log.info("%s: %d parameters on %s (%d threads, %s data, world %d)", cfg.model.kind, n_params, device,
                     threads, "streamed" if streaming else "in-memory", dist.world)
            log.info("train: %s", ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.train).items()))
        # What the weights depend on; runtime and paths are not in it, so a resume may change them.
        identity = {"architecture": arch, "data": meta["sha256"], "train": dataclasses.asdict(cfg.train)}
        if resume and run_id is None:  # carry on in the run the interrupted training was logging to
            run_id = _checkpoint_run(layout, identity)
        tracked = contextlib.nullcontext(None)
        if dist.is_main:
            from ..tracking.runs import stage_run

            tracked = stage_run(cfg, "train", layout.run_ref, extra_tags=extra_tags, new=True, run_id=run_id,
                                parent_run_id=parent_run_id, reopen_ended=resume, journal_dir=layout.models)
        with tracked as run:
            runtime_tags = {"runtime.threads": str(threads), "runtime.device": str(device),
                            "runtime.torch": torch.__version__}
            tracking_seconds = _start_tracking(cfg, run, meta, {**(extra_tags or {}), **runtime_tags}) \
                if run else 0.0
            checkpoint = None if trial else Checkpointing(
                layout.checkpoint, resume, identity, {"run_id": run.run_id if run else None},
                on_saved=_uploader(run) if run and checkpoint_to_run else None)
            hooks = Hooks(on_epoch_end=run.log_epoch if run else None, on_batch=on_batch if dist.is_main else None,
                          log=log.info if dist.is_main else (lambda _: None), deadline=deadline,
                          stop=trial.stop if trial else None)
            result = fit(model, train, val, cfg.train, checkpoint=checkpoint, hooks=hooks, dist=dist)
            summary = {**result.summary(), "train_seconds": round(result.seconds, 3), "parameters": n_params,
                       "device": str(device), "threads": threads, "world_size": dist.world,
                       "model_kind": cfg.model.kind, **({"train_images": len(train)} if trial else {})}
            if run and checkpoint is not None and checkpoint.resumed_after is not None:
                summary["resumed_after_epochs"] = _record_resume(run, checkpoint.resumed_after)
            if run:
                run.log_metrics({"kept_val_loss": result.kept_val_loss, "kept_val_acc": result.kept_val_acc,
                                 "kept_epoch": result.kept_epoch, "parameters": n_params,
                                 "train_seconds": result.seconds})
                summary["run_id"] = run.run_id
                summary["tracking_setup_seconds"] = round(tracking_seconds, 3)
            if dist.is_main:  # only a training that got this far replaces the previous outputs
                _write_outputs(layout, result, arch, summary, run, meta)
            if run:
                run.require_synced()  # a tracking outage that outlasted training: exit non-zero, naming the run
    return {k: v for k, v in summary.items() if k != "history"} | {
        "model_path": str(layout.best), "seconds": round(time.perf_counter() - start, 3)}


def _build_model(cfg: Config, meta: dict, device):
    """The configured model, seeded, on `device`, and its architecture record (what best.pt stores)."""
    import torch

    from ..models.classifier import architecture, build_model

    n_classes = len(meta["classes"])
    arch = architecture(cfg.model, meta["image_shape"], n_classes, meta["classes"], meta["normalization"])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tuple(meta["image_shape"]), n_classes, meta["normalization"]["mean"],
                        meta["normalization"]["std"]).to(device)
    return model, arch


def _load_data(cfg: Config, layout: Layout, device, dist, subset: Optional[int] = None):
    """Train and val batch sources, the prepare metadata, and whether the splits are streamed.
    `subset`: that many train images, drawn with train.seed (validation stays whole: it is what a sweep ranks by)."""
    from ..data.batches import Batches, load_split, read_meta, split_nbytes, subset_split

    meta = read_meta(layout.meta, cfg.data)
    splits = [layout.split("train"), layout.split("val")]
    streaming = cfg.runtime.loader == "stream" or (
        cfg.runtime.loader == "auto" and split_nbytes(splits) > cfg.runtime.memory_limit_gb * 2**30)
    train, val = (load_split(p, mmap=streaming) for p in splits)
    if subset is not None:
        train = subset_split(train, subset, cfg.train.seed)
    train, val = (Batches(s, device, streaming, dist.rank, dist.world) for s in (train, val))
    return train, val, meta, streaming


def _start_tracking(cfg: Config, run, meta: dict, extra_tags: Optional[dict[str, str]]) -> float:
    """Params and lineage tags on the run; returns the seconds it took."""
    from mlflow.entities import Param

    from ..tracking.lineage import flat_params, lineage_tags

    t0 = time.perf_counter()
    run.client.log_batch(run.run_id, params=[Param(k, v) for k, v in flat_params(cfg).items()])
    run.set_tags(lineage_tags(cfg, meta["sha256"], extra_tags))
    checks = meta.get("checks") or []  # prepare's data checks: the gate reads meta.json, people read the run
    run.set_tags({f"data.check.{c['name']}": c["status"] + (f": {c['detail']}"[:500] if c.get("detail") else "")
                  for c in checks})
    fixed = meta.get("corrections")  # data.corrections as prepare applied them (data/corrections.py)
    if fixed:
        run.set_tags({"data.corrections_sha256": fixed["sha256"][:16], "data.corrections": (
            f"{fixed['relabelled']} relabelled, {fixed['dropped']} dropped ({fixed['rows']} rows of {fixed['file']}, "
            f"{fixed['absent']} not in these splits)")})
    run.log_splits(Layout.of(cfg), meta, {"train": "training", "val": "validation"})
    log.info("MLflow run %s (%s)", run.run_id, run.where())
    return time.perf_counter() - t0


def _uploader(run) -> Callable[[Any, int], None]:
    def upload(path, epoch: int) -> None:
        from ..tracking.remote import upload_checkpoint

        try:
            upload_checkpoint(run.client, run.run_id, path, epoch)
        except Exception as exc:  # noqa: BLE001 - the training is worth more than being able to resume it
            log.warning("MLflow run %s: the checkpoint of epoch %d was not uploaded (%s); were this worker lost now, "
                        "the training would resume from an earlier epoch", run.run_id, epoch,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return upload


def _record_resume(run, after_epoch: int) -> list[int]:
    """Every resume of this training so far, the run's tag `train.resumed_after_epochs` (e.g. "1,3")."""
    earlier = run.client.get_run(run.run_id).data.tags.get("train.resumed_after_epochs")
    resumes = [*(int(e) for e in earlier.split(",") if e), after_epoch] if earlier else [after_epoch]
    run.set_tags({"train.resumed_after_epochs": ",".join(map(str, resumes))})
    return resumes


def _checkpoint_run(layout: Layout, identity: dict) -> Optional[str]:
    """The MLflow run a resumable checkpoint was logging to, if it matches this training."""
    from ..training.checkpoint import load_checkpoint

    if not layout.checkpoint.is_file():
        return None
    ck = load_checkpoint(layout.checkpoint)
    return ck.get("extra", {}).get("run_id") if ck.get("identity") == identity else None


def _write_outputs(layout: Layout, result, arch: dict, summary: dict, run, meta: dict) -> None:
    """best.pt and the metrics, then run.json last: the record that binds them to the run and the data."""
    from ..files import sha256_file, write_bytes, write_json
    from ..tracking.runs import save_run_ref
    from ..training.checkpoint import save_torch

    save_torch(layout.best, {"state_dict": result.best_state, "architecture": arch})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    write_bytes(layout.train_history, buf.getvalue().encode())
    write_json(layout.train_summary, summary)
    write_json(layout.train_scores, {k: summary[k] for k in SCORES if k in summary})
    save_run_ref(layout.run_ref, run, best_sha256=sha256_file(layout.best), data_sha256=meta["sha256"])
