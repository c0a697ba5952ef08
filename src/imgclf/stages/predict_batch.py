"""predict-batch: score a folder of images or an IDX file with the production model, in batches; check the
batch for drift against the model's training data; write one folder per batch and log an MLflow run of
kind `inference`, linked to the model version.

The batch folder (monitor.out_dir/<UTC time>-<input name>, or --out) holds predictions.csv (id, class,
probability, low_confidence, model, version, input_sha256), rejected.csv, summary.json, drift.json,
drift.html, drift.png and profile.npz (the batch's statistics, embeddings and predictions, for monitoring
over time). It is written beside its final name and renamed into place: a crash leaves no half batch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

from ..config import Config
from ..files import write_json
from ..locks import FolderBusy, file_lock, private_dir
from ..progress import Progress

log = logging.getLogger("imgclf")
INFERENCE_KIND = {"run_kind": "inference"}


def ticker(progress: Optional[Progress], every_s: float = 10.0) -> Progress:
    """The progress callback, plus a log line at least every `every_s` seconds (workers and CI have no bar)."""
    last = [time.monotonic()]

    def update(what: str, done: int, total: Optional[int]) -> None:
        if progress:
            progress(what, done, total)
        if time.monotonic() - last[0] >= every_s:
            last[0] = time.monotonic()
            log.info("%s: %d of %s images", what, done, total if total is not None else "?")

    return update


def default_out(cfg: Config, source: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return Path(cfg.monitor.out_dir) / f"{stamp}-{Path(source).name or 'batch'}"


def cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading =, +, -, @, tab or CR would make it a formula (a file
    named `=HYPERLINK(...)` in an inbox is anyone's to choose), so those get a leading apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _write_outputs(tmp: Path, batch, probs: np.ndarray, classes: list[str], name: str, version: str,
                   low: float, summary: dict, drift: Optional[dict], figures: Optional[tuple]) -> None:
    # backslashreplace: a file name that is not UTF-8 (bytes the file system allows) is written, escaped,
    # rather than failing the whole batch after it was scored
    with open(tmp / "predictions.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "class", "probability", "low_confidence", "model", "version", "input_sha256"])
        top, cls = probs.max(1), probs.argmax(1)
        for i, sid in enumerate(batch.ids):
            w.writerow([cell(sid), cell(classes[cls[i]]), f"{top[i]:.6f}", int(top[i] < low), name, version,
                        batch.hashes[i]])
    with open(tmp / "rejected.csv", "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "reason"])
        w.writerows([cell(str(sid)), cell(str(reason))] for sid, reason in batch.rejected)
    write_json(tmp / "summary.json", summary)
    if drift is not None:
        write_json(tmp / "drift.json", drift)
    if figures is not None:
        png, page = figures
        (tmp / "drift.png").write_bytes(png)
        (tmp / "drift.html").write_text(page, encoding="utf-8")


def _log_run(cfg: Config, out: Path, summary: dict, drift: Optional[dict], model_uri: str,
             model_run_id: str, extra_tags: Optional[dict], publish: Callable[[], None]) -> None:
    """The inference run, ended FINISHED only once `publish` has put the batch folder in place: a batch that
    never reached its folder is a FAILED run, never a finished one for a folder that is not there."""
    from ..tracking.runs import run_context

    experiment = f"{cfg.runtime.tracking.experiment}-inference"
    where = dataclasses.replace(cfg, runtime=dataclasses.replace(
        cfg.runtime, tracking=dataclasses.replace(cfg.runtime.tracking, experiment=experiment)))
    tags = {**INFERENCE_KIND, "model.uri": model_uri, "model.name": summary["model"], "model.version": summary["version"],
            "model.run_id": model_run_id,
            "batch.source": summary["source"], "drift": str(bool(drift and drift.get("drifted"))).lower(),
            "drift.reference_verified": str(bool(drift and drift.get("reference_verified"))).lower(),
            **(extra_tags or {})}
    metrics = {"images": summary["images"], "rejected": summary["rejected"], "images_per_s": summary["images_per_s"],
               "score_images_per_s": summary["score_images_per_s"], "mean_probability": summary["mean_probability"],
               "low_confidence_share": summary["low_confidence_share"]}
    for name, d in ((drift or {}).get("detectors") or {}).items():
        metrics[f"drift.{name}"] = float(d["drifted"])
        for k in ("domain_auc", "mmd_p_value", "domain_auc_p_value", "tvd", "p_value"):
            if k in d:
                metrics[f"drift.{name}.{k}"] = d[k]
        for stat, t in d.get("tests", {}).items():
            metrics[f"drift.stat.{stat}.shift"], metrics[f"drift.stat.{stat}.p_value"] = t["shift"], t["p_value"]
    with run_context(where, run_name=f"inference {Path(summary['source']).name} {summary['model']} v{summary['version']}",
                     tags=tags) as run:
        run.log_metrics(metrics)
        for f in sorted(out.iterdir()):
            run.client.log_artifact(run.run_id, str(f), "batch")
        summary["mlflow_run_id"], summary["mlflow_experiment_id"] = run.run_id, run.experiment_id
        publish()


@contextlib.contextmanager
def _claim(target: Path) -> Iterator[None]:
    """The batch folder's one writer. The lock lives in this user's private lock folder, named by the target's
    path, so an inbox's out_dir gathers no lock files."""
    key = hashlib.sha256(os.fsencode(target.resolve())).hexdigest()[:24]
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(private_dir() / f"predict-batch-{key}.lock", timeout=0))
    except TimeoutError:
        raise FolderBusy(f"{target}: another predict-batch is writing this batch folder; "
                         "choose another --out") from None
    with held:
        yield


def predict_batch_stage(cfg: Config, source: str, model_uri: Optional[str] = None, out: Optional[str] = None,
                        progress: Optional[Progress] = None, extra_tags: Optional[dict[str, str]] = None,
                        settle_s: float = 0.0) -> dict:
    """`settle_s`: leave files changed in the last settle_s seconds for the next batch (an inbox)."""
    start = time.perf_counter()
    target = Path(out) if out else default_out(cfg, source)
    # One writer per batch folder, claimed before any work: a second run for the same --out fails at once,
    # naming the first, instead of scoring everything and losing the rename.
    with _claim(target):
        if target.exists():
            raise FileExistsError(f"{target}: already exists; batch outputs are never overwritten "
                                  "(choose another --out)")
        summary, batch = _score_and_write(cfg, source, model_uri, target, progress, extra_tags, settle_s, start)
    summary["out"] = str(target)
    summary["files"] = [str(p) for p in batch.files]
    log.info("%d images scored in %.1f s (%.0f images/s; model %.0f images/s) -> %s",
             len(batch), summary["seconds"], summary["images_per_s"], summary["score_images_per_s"], target)
    return summary


def _score_and_write(cfg: Config, source: str, model_uri: Optional[str], target: Path,
                     progress: Optional[Progress], extra_tags: Optional[dict[str, str]], settle_s: float,
                     start: float) -> tuple[dict, Any]:
    from ..monitoring.drift import Profile, detect, image_features
    from ..monitoring.drift_report import figure_png, html_report
    from ..monitoring.embeddings import score
    from ..monitoring.inputs import read_batch
    from ..monitoring.reference import model_run, reference_profile
    from .predict import serving_model

    model, answered = serving_model(cfg, model_uri or cfg.monitor.model_uri)
    c, size, _ = model.in_shape
    progress = ticker(progress)
    batch = read_batch(source, c, size, progress, settle_s=settle_s)
    log.info("%s: %d images to score with %s (%d rejected)", source, len(batch), answered, len(batch.rejected))
    t0 = time.perf_counter()
    probs, emb = score(model.network, model.temperature, batch.images, cfg.runtime.eval_batch_size, progress)
    score_s = time.perf_counter() - t0
    predicted = probs.argmax(1)
    name, version = (answered.split("/")[1], answered.split("/")[2]) if answered.startswith("models:/") and \
        answered.count("/") == 2 else (answered, "")
    drift, figures = None, None
    current = Profile(image_features(batch.images, batch.sizes), emb, predicted)
    run = model_run(cfg, answered) if cfg.tracking.enabled else None
    if cfg.monitor.drift.enabled:
        reference, verified = reference_profile(cfg, model.network, model.temperature, model.classes, answered,
                                      run[1] if run else None, with_sizes=batch.sizes is not None)
        # A verdict against a reference nothing ties to the model says so, in the report and the summary.
        drift = {**detect(reference, current, model.classes, cfg.monitor.drift, cfg.train.seed),
                 "reference_verified": verified}
        title = f"Drift: {Path(source).name} vs {name} v{version} training data"
        png = figure_png(reference, current, model.classes, drift)
        figures = (png, html_report(drift, title, png))
        if drift.get("drifted"):
            log.warning("DRIFT: %s", drift["reason"])
        else:
            log.info("no drift%s: %s", "" if drift.get("tested") else " tested", drift["reason"])
    top = probs.max(1)
    low = cfg.evaluate.low_confidence
    counts = np.bincount(predicted, minlength=len(model.classes))
    summary: dict[str, Any] = {
        "source": str(source), "images": len(batch), "rejected": len(batch.rejected),
        "rejected_examples": [f"{i}: {why}" for i, why in batch.rejected[:10]], "model": name, "version": version,
        "model_uri": answered, "temperature": model.temperature,
        "class_counts": dict(zip(model.classes, counts.tolist())),
        "mean_probability": round(float(top.mean()), 6), "low_confidence_share": round(float((top < low).mean()), 6),
        "score_seconds": round(score_s, 3), "score_images_per_s": round(len(batch) / max(score_s, 1e-9), 1),
        "drift": {**{k: drift[k] for k in ("tested", "drifted", "reason", "reference_verified") if k in drift},
                  "flagged": drift.get("flagged", [])} if drift else None}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        summary["images_per_s"] = round(len(batch) / summary["seconds"], 1)
        np.savez_compressed(tmp / "profile.npz", ids=np.array(batch.ids), predicted=predicted, probability=top,
                            embeddings=emb[:5000].astype(np.float16),
                            **{f"stat_{k}": v for k, v in current.features.items()})
        _write_outputs(tmp, batch, probs, model.classes, name, version, low, summary, drift, figures)

        def publish() -> None:
            write_json(tmp / "summary.json", summary)
            os.replace(tmp, target)

        if cfg.tracking.enabled:
            _log_run(cfg, tmp, summary, drift, answered, run[0] if run else "", extra_tags, publish)
        else:
            publish()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary, batch
