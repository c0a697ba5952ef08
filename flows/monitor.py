"""The flows that run while a model is in use:

- `batch-inference`: score a folder or IDX file (default: the inbox, monitor.inbox) with the production
  model, check drift, publish the report as a Prefect artifact. A drifted batch ends in the state
  `Drifted` (type Completed: its predictions are written and valid) and emits imgclf.drift.detected.
  From the inbox, only files at rest for `settle_s` are taken, and every file read moves to
  inbox/scored/<batch>/ once the batch's outputs are written.
- `data-refresh`: the download stage alone; a changed raw data hash emits imgclf.data.changed, which a
  training-pipeline deployment made with `flows.deploy --retrain-on-new-data` runs on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

CODE = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("imgclf") is None:
    sys.path.insert(0, str(CODE / "src"))

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from flows.pipeline import flow_run_tags, load_config  # noqa: E402
from tasks import events  # noqa: E402
from tasks import stages as stage_tasks  # noqa: E402

DRIFTED = "Drifted"


def _move_scored(inbox: Path, files: list[str], batch: str) -> int:
    """Files read into a batch leave the inbox for inbox/scored/<batch>/, keeping their sub-folders."""
    moved = 0
    for f in map(Path, files):
        target = inbox / "scored" / batch / f.relative_to(inbox)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(str(f), target)
            moved += 1
        except FileNotFoundError:  # taken away meanwhile (by hand): nothing to move
            pass
    return moved


def _report(summary: dict[str, Any]) -> str:
    from imgclf.monitoring.drift_report import markdown
    from imgclf.tracking.store import page, run_route

    drift = summary.get("drift_report")
    text = markdown(drift, f"Batch {Path(summary['out']).name}") if drift else "# Batch scored\n\nDrift not checked.\n"
    counts = ", ".join(f"{k}: {v}" for k, v in summary["class_counts"].items())
    link = ""
    if summary.get("mlflow_run_id"):
        link = page(summary["tracking_uri"], run_route(summary["mlflow_experiment_id"], summary["mlflow_run_id"]))
    return (f"{text}\n{summary['images']} images scored by `{summary['model_uri']}` "
            f"({summary['images_per_s']:.0f} images/s), {summary['rejected']} rejected; "
            f"{summary['low_confidence_share']:.1%} under the low-confidence threshold.\n\nPredicted: {counts}\n\n"
            f"Outputs: `{summary['out']}` (predictions.csv, drift.html); MLflow run: {link}\n")


@flow(name="batch-inference", result_serializer="json")
def batch_inference(source: Optional[str] = None, params_path: str = "params.yaml",
                    overrides: Optional[dict[str, Any]] = None, model_uri: Optional[str] = None,
                    settle_s: float = 10.0):
    """`source`: a folder or an IDX file; None: the inbox (monitor.inbox), its scored files moved out. One run
    scores an inbox at a time (a lock file in it); another finds it held and ends `Busy`."""
    from imgclf.locks import file_lock
    from imgclf.monitoring.inputs import list_images

    cfg = load_config(params_path, overrides)
    if source is not None:
        return _score(cfg, Path(source), model_uri, inbox=False, settle_s=0.0)
    where = Path(cfg.monitor.inbox)
    if not where.is_dir() or not list_images(where, settle_s):
        get_run_logger().info("inbox %s: nothing new to score", where)
        return Completed(message=f"inbox {where}: nothing new", name="Empty")
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(where / ".imgclf-inbox.lock", timeout=1.0))
        except TimeoutError:
            return Completed(message=f"inbox {where}: another batch-inference run is scoring it", name="Busy")
        return _score(cfg, where, model_uri, inbox=True, settle_s=settle_s)


def _score(cfg, where: Path, model_uri: Optional[str], inbox: bool, settle_s: float):
    from imgclf.files import read_json_file
    from imgclf.tracking.store import tracking_uri

    logger = get_run_logger()
    summary = stage_tasks.predict_batch(cfg, str(where), model_uri, extra_tags=flow_run_tags(), settle_s=settle_s)
    out = Path(summary["out"])
    if inbox:
        logger.info("%d files moved to %s", _move_scored(where, summary["files"], out.name), where / "scored" / out.name)
    summary.pop("files")
    drift_file = out / "drift.json"
    summary["drift_report"] = read_json_file(drift_file) if drift_file.is_file() else None
    summary["tracking_uri"] = tracking_uri(cfg.tracking)
    create_markdown_artifact(_report(summary), key="drift-report", description="Batch scoring and drift")
    drift = summary.get("drift") or {}
    result = {k: v for k, v in summary.items() if k not in ("drift_report", "tracking_uri")}
    if drift.get("drifted"):
        events.emit(events.DRIFT_DETECTED, f"imgclf.batch.{out.name}",
                    {"imgclf.model": summary["model"], "imgclf.version": summary["version"]},
                    {"reason": drift["reason"], "flagged": drift.get("flagged"), "out": str(out),
                     "model_uri": summary["model_uri"], "images": summary["images"], "report": _report_link(summary)})
        logger.warning("batch %s drifted: %s", out.name, drift["reason"])
        return Completed(message=f"drift: {drift['reason']}"[:500], name=DRIFTED, data=result)
    logger.info("batch %s: %s", out.name, drift.get("reason", "drift not checked"))
    return result


def _report_link(summary: dict) -> str:
    """Where the receiver of a drift notification can open the report: the batch's MLflow run (drift.html is
    its artifact), not the folder on the worker, which it can't reach."""
    from imgclf.tracking.store import page, run_route

    if not summary.get("mlflow_run_id"):
        return f"{summary['out']}/drift.html on the machine that scored it (tracking was off)"
    route = run_route(summary["mlflow_experiment_id"], summary["mlflow_run_id"])
    return f"batch/drift.html of MLflow run {page(summary['tracking_uri'], route)}"


@flow(name="data-refresh", result_serializer="json")
def data_refresh(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                 mirrors: Optional[list[str]] = None) -> dict:
    """Download only; emits imgclf.data.changed when the raw data's hash moved."""
    cfg = load_config(params_path, overrides)
    return stage_tasks.download(cfg, mirrors)
