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

LOGGED_MODEL_FILE = "logged_model.json"  # evaluate's record of the MLflow model it logged
REGISTERED_FILE = "registered.json"  # register's record of the version and the gate's decision


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
    if cfg.data.dvc_file:
        from .versioning import track_raw

        record["dvc"] = track_raw(cfg.data.raw_dir, cfg.data.dvc_file, log=log.info)
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


def prepare_stage(cfg: Config, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    start = time.perf_counter()
    meta = prepare(cfg.data, progress)
    log.info("prepared %s: %s", cfg.data.processed_dir,
             ", ".join(f"{k} {v}" for k, v in meta["sizes"].items()))
    return {"processed_dir": cfg.data.processed_dir, "sizes": meta["sizes"],
            "sha256": meta["sha256"], "seconds": round(time.perf_counter() - start, 3)}



def _tracked(cfg: Config, stage: str, extra_tags: Optional[dict[str, str]] = None, new: bool = False,
             run_id: Optional[str] = None):
    """The pipeline's MLflow run for a stage (`run_id`, else run.json; a fresh one if `new`), or a no-op."""
    import contextlib

    from .tracking import load_run_ref, run_context

    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    if run_id:
        new, ref = False, {"run_id": run_id}
    else:
        ref = None if new else load_run_ref(cfg.train.out_dir)
    if not new and ref is None:
        raise FileNotFoundError(f"{Path(cfg.train.out_dir) / 'run.json'}: no MLflow run recorded; run the train stage first")
    return run_context(cfg, run_id=ref["run_id"] if ref else None, run_name=f"{cfg.model.kind}-{time.strftime('%Y%m%d-%H%M%S')}",
                       tags={**(extra_tags or {}), f"stage.{stage}": "started"},
                       parent_run_id=(extra_tags or {}).get("imgclf.parent_run_id"))


def train_stage(cfg: Config, resume: bool = False, on_epoch_end=None, on_batch=None,
                deadline: Optional[float] = None, extra_tags: Optional[dict[str, str]] = None,
                run_id: Optional[str] = None) -> dict:
    """Train the configured model on data/processed; write the best weights and metrics.

    With tracking on, a new MLflow run is opened (before any training, so an unreachable
    server fails fast), params, lineage and per-epoch metrics go to it, and its id is
    written to <train.out_dir>/run.json for the later stages. `run_id` reuses a run made
    beforehand (remote training: the pipeline made it and shipped the inputs as its artifacts).
    """
    import torch

    from .data import Batches, load_split, read_meta, split_nbytes
    from .models import architecture, build_model, parameter_count
    from .train import DistInfo, fit, resolve_device, set_threads

    stage_start = time.perf_counter()
    dist = DistInfo.from_env()
    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if cfg.train.device != "cpu" and torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        threads = set_threads(cfg.train.threads, dist.world)
        device = resolve_device(cfg.train.device, dist.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        processed = Path(cfg.data.processed_dir)
        meta = read_meta(processed)
        streaming = cfg.train.loader == "stream" or (
            cfg.train.loader == "auto" and split_nbytes(processed) > cfg.train.memory_limit_gb * 2**30)
        train = Batches(load_split(processed, "train", mmap=streaming), device, streaming, dist.rank, dist.world)
        val = Batches(load_split(processed, "val", mmap=streaming), device, streaming, dist.rank, dist.world)
        n_classes = len(meta["classes"])
        arch = architecture(cfg.model, meta["image_shape"], n_classes, meta["classes"], meta["normalization"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, tuple(meta["image_shape"]), n_classes,
                            meta["normalization"]["mean"], meta["normalization"]["std"]).to(device)
        n_params = parameter_count(model)
        if dist.is_main:
            log.info("%s: %d parameters on %s (%d threads, %s data, world %d)", cfg.model.kind, n_params, device,
                     threads, "streamed" if streaming else "in-memory", dist.world)
        out_dir = Path(cfg.train.out_dir)
        identity = {"architecture": arch, "data": meta["sha256"], "train": cfg.to_dict()["train"]}
        checkpoint = out_dir / "checkpoint.pt"
        if resume and run_id is None:  # carry on in the run the interrupted training was logging to
            run_id = _checkpoint_run(checkpoint, identity)
        tracked = _tracked(cfg, "train", extra_tags, new=True, run_id=run_id) if dist.is_main else _nullcontext()
        with tracked as run:
            callbacks = [cb for cb in (run.log_epoch if run else None, on_epoch_end) if cb]
            if run:
                from .tracking import flat_params, lineage_tags, save_run_ref

                t0 = time.perf_counter()
                run.client.log_batch(run.run_id, params=[_param(k, v) for k, v in flat_params(cfg).items()])
                run.set_tags(lineage_tags(cfg, meta["sha256"], extra_tags))
                save_run_ref(out_dir, run)
                log.info("MLflow run %s (%s)", run.run_id, run.url())
                tracking_setup_seconds = time.perf_counter() - t0
            result = fit(model, train, val, cfg.train, checkpoint=checkpoint, resume=resume, identity=identity,
                         checkpoint_extra={"run_id": run.run_id if run else None},
                         on_epoch_end=(lambda r: [cb(r) for cb in callbacks]) if dist.is_main else None,
                         on_batch=on_batch if dist.is_main else None,
                         log=log.info if dist.is_main else (lambda _: None), deadline=deadline, dist=dist)
            summary = {**result.summary(), "parameters": n_params, "device": str(device), "threads": threads,
                       "world_size": dist.world, "model_kind": cfg.model.kind}
            if dist.is_main:
                _write_train_outputs(cfg, result, arch, summary)
            if run:
                run.log_metrics({"best_val_loss": result.best_val_loss, "best_val_acc": result.best_val_acc,
                                 "best_epoch": result.best_epoch, "parameters": n_params,
                                 "train_seconds": result.seconds})
                summary["run_id"] = run.run_id
                summary["tracking_setup_seconds"] = round(tracking_setup_seconds, 3)
        return {k: v for k, v in summary.items() if k != "history"} | {
            "model_path": str(out_dir / "best.pt"), "stage_seconds": round(time.perf_counter() - stage_start, 3)}
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _checkpoint_run(checkpoint: Path, identity: dict) -> Optional[str]:
    """The MLflow run a resumable checkpoint was logging to, if it matches this training."""
    from .train import load_checkpoint

    if not checkpoint.is_file():
        return None
    ck = load_checkpoint(checkpoint)
    return ck.get("extra", {}).get("run_id") if ck.get("identity") == identity else None


def _nullcontext():
    import contextlib

    return contextlib.nullcontext(None)


def _param(key: str, value: str):
    from mlflow.entities import Param

    return Param(key, value)


def _write_train_outputs(cfg: Config, result, arch: dict, summary: dict) -> None:
    import csv
    import io

    import torch

    from .files import atomic_file, write_bytes, write_json

    with atomic_file(Path(cfg.train.out_dir) / "best.pt") as fh:
        torch.save({"state_dict": result.best_state, "architecture": arch}, fh)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(result.history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(result.history)
    metrics_dir = Path(cfg.train.metrics_dir)
    write_bytes(metrics_dir / "train_history.csv", buf.getvalue().encode())
    write_json(metrics_dir / "train.json", summary)


def load_best_model(cfg: Config):
    """The trained model and its architecture record from <train.out_dir>/best.pt (weights only)."""
    import torch

    from .models import from_architecture

    path = Path(cfg.train.out_dir) / "best.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run the train stage first")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    model = from_architecture(blob["architecture"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["architecture"]


def evaluate_stage(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Score the best model on the test split; write reports, pictures, TorchScript and metrics/test.json."""
    import pandas as pd

    from . import plots
    from .data import load_split, read_meta
    from .evaluate import evaluate, export_torchscript
    from .files import atomic_path, read_json_file, write_json

    start = time.perf_counter()
    model, arch = load_best_model(cfg)
    meta = read_meta(cfg.data.processed_dir)
    test = load_split(cfg.data.processed_dir, "test")
    ev = evaluate(model, test, arch["classes"], cfg.evaluate.batch_size)
    out = Path(cfg.evaluate.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_class.csv") as tmp:
        ev.per_class().to_csv(tmp, index=False, float_format="%.6f")
    with atomic_path(out / "predictions.csv") as tmp:  # long form, for `dvc plots` confusion matrices
        pd.DataFrame({"actual": [arch["classes"][i] for i in test.labels.numpy()],
                      "predicted": [arch["classes"][i] for i in ev.predictions]}).to_csv(tmp, index=False)
    images = test.images.numpy()
    sample = test.images[0].float() / 255
    history_path = Path(cfg.train.metrics_dir) / "train.json"
    figures = {
        "confusion_matrix.png": plots.confusion_matrix(ev.confusion, arch["classes"]),
        "misclassified.png": plots.misclassified(images, test.labels.numpy(), ev.predictions, ev.probabilities,
                                                 arch["classes"], cfg.evaluate.max_misclassified),
        "seed_kernels.png": plots.seed_kernels(sample),
    }
    if history_path.is_file():
        figures["learning_curves.png"] = plots.learning_curves(read_json_file(history_path)["history"])
    for name, fig in (("conv_filters.png", plots.conv_filters(model)), ("feature_maps.png", plots.feature_maps(model, sample))):
        if fig is not None:
            figures[name] = fig
    for name, fig in figures.items():
        plots.save(fig, out / name)
    torchscript = Path(cfg.train.out_dir) / "model.pt"
    export_torchscript(model, sample[None].repeat(2, 1, 1, 1), torchscript)
    metrics = ev.metrics()
    write_json(Path(cfg.train.metrics_dir) / "test.json", metrics)
    work_seconds = time.perf_counter() - start
    record = {**metrics, "reports": str(out), "torchscript": str(torchscript), "seconds": round(work_seconds, 3)}
    with _tracked(cfg, "evaluate", extra_tags) as run:
        if run:
            t0 = time.perf_counter()
            from .serving import log_model
            run.log_metrics(metrics, prefix="test_")
            for f in sorted(out.iterdir()):
                run.log_artifact(f, "reports")
            run.log_artifact(torchscript, "torchscript")
            run.log_artifact(Path(cfg.train.metrics_dir) / "train_history.csv", "metrics")
            model_uri = log_model(run.run_id, model, arch)
            # A file of its own: rewriting train's run.json would make DVC rerun train.
            write_json(Path(cfg.train.out_dir) / LOGGED_MODEL_FILE,
                       {"run_id": run.run_id, "model_uri": model_uri, "test": metrics, "data_sha256": meta["sha256"]})
            record["model_uri"] = model_uri
            record["tracking_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("test: accuracy %.4f, macro F1 %.4f, loss %.4f", ev.accuracy, ev.macro_f1, ev.loss)
    return record


def register_stage(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Register the evaluated model as a new version (alias challenger), then run the promotion gate."""
    from . import registry
    from .data import load_split
    from .files import read_json_file, write_json
    from .serving import LoadedModel
    from .tracking import connect

    start = time.perf_counter()
    if not cfg.tracking.enabled:
        raise ValueError("tracking.enabled: the register stage needs MLflow (set it to true)")
    ref_path = Path(cfg.train.out_dir) / LOGGED_MODEL_FILE
    if not ref_path.is_file():
        raise FileNotFoundError(f"{ref_path}: no logged model; run the evaluate stage first")
    ref = read_json_file(ref_path)
    client, _ = connect(cfg.tracking)
    test_metrics = ref["test"]
    run = client.get_run(ref["run_id"])
    lineage = {k: v for k, v in run.data.tags.items() if k.startswith(("git.", "data.", "params.", "prefect."))}
    tags = {**lineage, **{f"test.{k}": str(v) for k, v in test_metrics.items()}, "model.kind": cfg.model.kind}
    description = (f"{cfg.model.kind} trained by run {ref['run_id']}: test accuracy {test_metrics['accuracy']:.4%}, "
                   f"macro F1 {test_metrics['macro_f1']:.4f}.")
    name = cfg.register.model_name
    version, created = registry.register_version(client, name, ref["model_uri"], ref["run_id"], tags, description)
    test = load_split(cfg.data.processed_dir, "test")

    def score(uri: str) -> float:
        return LoadedModel(uri).accuracy(test.images.numpy(), test.labels.numpy())

    decision = registry.gate(client, name, version, test_metrics["accuracy"], cfg.register.min_accuracy,
                             cfg.register.min_improvement, score)
    with _tracked(cfg, "register", extra_tags) as tracked:
        if tracked:
            tracked.set_tags({"registry.model": name, "registry.version": version,
                              "registry.promoted": str(decision.promoted).lower(), "registry.reason": decision.reason})
    log.info("%s v%s %s: %s", name, version, "promoted to production" if decision.promoted else "not promoted",
             decision.reason)
    record = {**decision.as_dict(), "model": name, "created": created, "run_id": ref["run_id"]}
    write_json(Path(cfg.train.out_dir) / REGISTERED_FILE, record)
    return {**record, "seconds": round(time.perf_counter() - start, 3)}


def promote_stage(cfg: Config, version: Optional[str] = None, rollback: bool = False, reason: str = "") -> dict:
    from . import registry
    from .tracking import connect

    client, _ = connect(cfg.tracking)
    name = cfg.register.model_name
    if rollback:
        old, new = registry.rollback(client, name, reason or "manual rollback")
        return {"model": name, "from": old, "production": new, "action": "rollback"}
    if version is None:
        raise ValueError("promote: give --version N or --rollback")
    previous = registry.move_production(client, name, version, reason or "manual promotion", action="manual")
    return {"model": name, "from": previous, "production": str(version), "action": "promote"}


def predict_stage(cfg: Config, paths: list[str], model_uri: Optional[str] = None) -> list[dict]:
    from .serving import LoadedModel
    from .tracking import connect

    connect(cfg.tracking)
    model = LoadedModel(model_uri or f"models:/{cfg.register.model_name}@production")
    probs = model.probabilities(model.load_images(paths))
    return [{"file": str(p), "class": model.classes[int(row.argmax())], "probability": float(row.max())}
            for p, row in zip(paths, probs)]
