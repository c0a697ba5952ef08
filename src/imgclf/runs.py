"""MLflow runs: one run per pipeline run, opened and closed by the stages, batched metrics.

The run id travels between stages in run.json (see layout), so the CLI stages, `dvc repro`
and the Prefect flow all add to the same run. A run ends FINISHED, FAILED or KILLED,
and each stage's `stage.<name>` tag ends finished or failed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import Config
from .files import read_json_file, write_json
from .tracking import connect, redact, tracking_uri

log = logging.getLogger("imgclf")


class Run:
    """One MLflow run shared by the stages of a pipeline run."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri

    def log_epoch(self, record: dict[str, Any]) -> None:
        """All of one epoch's numbers in one call."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        step = int(record["epoch"])
        metrics = [Metric(k, float(v), ts, step) for k, v in record.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(prefix + k, float(v), ts, 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def route(self) -> str:
        return f"/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def where(self) -> str:
        """The run page on the tracking server, or how to open it over the embedded store."""
        if self.uri.startswith("http"):
            return redact(self.uri).rstrip("/") + self.route()
        return f"`imgclf ui`, then {self.route()}"


def save_run_ref(path: Path, run: Run) -> None:
    write_json(path, {"run_id": run.run_id, "experiment_id": run.experiment_id})


def load_run_ref(path: Path) -> Optional[dict[str, str]]:
    return read_json_file(path) if path.is_file() else None


def run_name(cfg: Config) -> str:
    return f"{cfg.model.kind}-{cfg.data.source}-{time.strftime('%Y%m%d-%H%M%S')}"


def stage_run(cfg: Config, stage: str, run_ref: Path, *, extra_tags: Optional[dict[str, str]] = None,
              new: bool = False, run_id: Optional[str] = None, parent_run_id: Optional[str] = None):
    """The pipeline's MLflow run for a stage (`run_id`, else the one in `run_ref`; a fresh one if `new`),
    or a no-op context when tracking is off."""
    if not cfg.tracking.enabled:
        return contextlib.nullcontext(None)
    if run_id:
        new = False
    elif not new:
        ref = load_run_ref(run_ref)
        if ref is None:
            raise FileNotFoundError(f"{run_ref}: no MLflow run recorded; run the train stage first")
        run_id = ref["run_id"]
    return run_context(cfg, run_id=run_id, run_name=run_name(cfg), tags=extra_tags,
                       parent_run_id=parent_run_id, stage=stage)


def _terminate(client, run_id: str, status: str, why: str = "", stage: Optional[str] = None) -> None:
    """Mark the run ended without masking the error that ended it (the server may be gone too)."""
    try:
        if stage:
            client.set_tag(run_id, f"stage.{stage}", "failed" if status == "FAILED" else status.lower())
        client.set_terminated(run_id, status)
        log.warning("MLflow run %s ended %s%s", run_id, status, f" ({why})" if why else "")
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow run %s could not be marked %s: %s", run_id, status, str(exc).splitlines()[0])


@contextlib.contextmanager
def run_context(cfg: Config, *, run_id: Optional[str] = None, run_name: Optional[str] = None,
                tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None,
                stage: Optional[str] = None) -> Iterator[Run]:
    """Open (or reopen) a run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C/SIGTERM.

    With `stage`, the tag `stage.<stage>` reads started, then finished or failed."""
    client, experiment_id = connect(cfg.tracking)
    uri = tracking_uri(cfg.tracking)
    tags = {**(tags or {}), **({f"stage.{stage}": "started"} if stage else {})}
    if run_id is None:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        created = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        run_id = created.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        if tags:
            Run(client, run_id, experiment_id, uri).set_tags(tags)
    run = Run(client, run_id, experiment_id, uri)
    try:
        yield run
    except Exception:
        _terminate(client, run_id, "FAILED", stage=stage)
        raise
    except BaseException as exc:  # Ctrl-C, SIGTERM (SystemExit, or Prefect's TerminationSignal)
        _terminate(client, run_id, "KILLED", type(exc).__name__, stage=stage)
        raise
    if stage:
        run.set_tags({f"stage.{stage}": "finished"})
    client.set_terminated(run_id, "FINISHED")
