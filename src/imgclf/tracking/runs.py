"""MLflow runs: one run per pipeline run, opened and closed by the stages, batched metrics.

The run id travels between stages in run.json (see layout), so the CLI stages, `dvc repro`
and the Prefect flow all add to the same run. A run ends FINISHED, FAILED or KILLED,
and each stage's `stage.<name>` tag ends finished or failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from ..config import Config
from ..console import raise_if_interrupted
from ..files import file_digest, read_json_file, write_json
from ..urls import redact
from .journal import MetricJournal, journal_path
from .store import TrackingUnavailable, check_reachable, connect, page, run_route, tracking_uri

log = logging.getLogger("imgclf")


EPOCH_PREFIX = "epoch/"

# How long a stage's writes wait for a tracking server that stopped answering (a restart, a failover) before
# the stage fails. MLflow's own retries give up after about 3 s on a refused connection (store.py keeps them
# short so that training never blocks); `mlflow server` itself takes 5-10 s to restart here.
RIDE_OUT_S = 90.0


def ride_out(uri: str, what: str, call, *args, within_s: float = RIDE_OUT_S, **kwargs):
    """`call(*args, **kwargs)`, tried again while the tracking server at `uri` does not answer, for up to
    `within_s` seconds; an error from a server that answers (or from an embedded store) is raised at once."""
    deadline, delay = time.monotonic() + within_s, 1.0
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if not _unanswered(uri, exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("MLflow: %s: the tracking server %s does not answer (%s); trying again in %.0f s", what,
                        redact(uri), str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(2 * delay, 15.0)


def _unanswered(uri: str, exc: BaseException) -> bool:
    """The server is down, or was when the call failed (a connection refused or cut, whatever answers now)."""
    if not uri.startswith(("http://", "https://")):
        return False
    text = str(exc)
    if any(s in text for s in ("Max retries exceeded", "Connection refused", "Connection aborted",
                               "RemoteDisconnected", "Connection reset")):
        return True
    try:
        check_reachable(uri, timeout=2.0)
    except TrackingUnavailable:
        return True
    return False


class Run:
    """One MLflow run shared by the stages of a pipeline run.

    With a `journal` (training), metrics go through it and survive a tracking outage."""

    def __init__(self, client, run_id: str, experiment_id: str, uri: str, journal: Optional[MetricJournal] = None):
        self.client, self.run_id, self.experiment_id, self.uri = client, run_id, experiment_id, uri
        self.journal = journal

    def _log(self, rows: list[tuple[str, float, int, int]], **linked: Optional[str]) -> None:
        if self.journal is not None:
            self.journal.record(rows)
            self.journal.flush()
            return
        from mlflow.entities import Metric

        ride_out(self.uri, f"run {self.run_id}: metrics", self.client.log_batch, self.run_id,
                 metrics=[Metric(k, v, ts, step, **linked) for k, v, ts, step in rows])

    def log_epoch(self, record: dict[str, Any]) -> None:
        """All of one epoch's numbers in one call, as epoch/<name>: the UI puts a section per prefix
        (alphabetically) before the plain names, so the curves come first and the summaries after."""
        ts, step = int(time.time() * 1000), int(record["epoch"])
        self._log([(EPOCH_PREFIX + k, float(v), ts, step) for k, v in record.items() if k != "epoch"])

    def log_metrics(self, metrics: dict[str, float], prefix: str = "", model_id: Optional[str] = None,
                    dataset: Optional[tuple[str, str]] = None) -> None:
        """To the run; with `model_id` also to that logged model, and with `dataset` (name, digest, as
        log_splits names the split) as measured on it: MLflow 3's Models view ranks the models by them."""
        ts = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        self._log([(prefix + k, float(v), ts, 0) for k, v in metrics.items()], model_id=model_id,
                  dataset_name=name, dataset_digest=digest)

    def require_synced(self) -> None:
        """Every journaled metric reached the server, or a one-line error naming the run and the journal."""
        if self.journal is not None and not self.journal.flush():
            raise TrackingUnavailable(
                f"MLflow run {self.run_id}: the tracking server is still unreachable ({redact(self.uri)}); "
                f"outputs are written and {self.journal.pending()} metric batches wait in {self.journal.path}: "
                "run `imgclf sync` when the server is back")

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        ride_out(self.uri, f"run {self.run_id}: tags", self.client.log_batch, self.run_id,
                 tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_splits(self, layout, meta: dict, contexts: dict[str, str]) -> None:
        """The splits as the run's Datasets: `<source>-<split>`, the file, its md5 (as DVC records it), a profile."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        inputs = []
        for split, context in contexts.items():
            path = layout.split(split)
            profile = {"images": meta.get("sizes", {}).get(split), "classes": len(meta.get("classes", [])),
                       "image_shape": meta.get("image_shape"), "sha256": meta.get("sha256", {}).get(path.name)}
            inputs.append(DatasetInput(Dataset(*split_dataset(layout, meta, split), "local", str(path.resolve()),
                                               profile=json.dumps(profile)),
                                       [InputTag("mlflow.data.context", context)]))
        for attempt in range(3):  # two runs adding the same new dataset at once: MLflow inserts it twice, one
            try:                  # fails on its UNIQUE constraint, and the next try finds the other's row
                return ride_out(self.uri, f"run {self.run_id}: datasets", self.client.log_inputs, self.run_id,
                                datasets=inputs)
            except MlflowException:
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        ride_out(self.uri, f"run {self.run_id}: artifact {Path(path).name}", self.client.log_artifact, self.run_id,
                 str(path), artifact_path)

    def where(self) -> str:
        """The run page on the tracking server, or how to open it over the embedded store."""
        return page(self.uri, run_route(self.experiment_id, self.run_id))


def split_dataset(layout, meta: dict, split: str) -> tuple[str, str]:
    """A split as an MLflow dataset: `<source>-<split>` and the file's md5 (as DVC records it)."""
    return f"{meta.get('source', 'data')}-{split}", file_digest(layout.split(split), "md5")


def save_run_ref(path: Path, run: Optional[Run], **identity: Any) -> None:
    """run.json: the run (None when tracking is off), the store it lives in, and the content hashes of what
    it made and read."""
    write_json(path, {"run_id": run.run_id if run else None, "experiment_id": run.experiment_id if run else None,
                      "tracking_uri": _store_id(run.uri) if run else None, **identity})


def _store_id(uri: str) -> str:
    return redact(uri).rstrip("/")


def check_same_store(ref: dict, cfg: Config, path: Path) -> None:
    """A record of a run in another tracking store (a team stack since taken down, another server) is not
    continued here: its run id means nothing in this one, or worse, names another run."""
    recorded = ref.get("tracking_uri")
    if not cfg.tracking.enabled or not ref.get("run_id") or recorded is None:
        return  # untracked, or written before run.json named its store
    here = _store_id(tracking_uri(cfg.tracking))
    if recorded != here:
        raise ValueError(f"{path}: run {ref['run_id']} lives in the tracking store {recorded}, but this stage would "
                         f"use {here}; point MLFLOW_TRACKING_URI (or runtime.tracking.uri) at that store, or train again")


def load_run_ref(path: Path) -> Optional[dict[str, str]]:
    return read_json_file(path) if path.is_file() else None


def run_name(cfg: Config) -> str:
    return f"{cfg.model.kind}-{cfg.data.source}-{time.strftime('%Y%m%d-%H%M%S')}"


def stage_run(cfg: Config, stage: str, run_ref: Path, *, extra_tags: Optional[dict[str, str]] = None,
              new: bool = False, run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
              reopen_ended: bool = False, journal_dir: Optional[Path] = None):
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
                       parent_run_id=parent_run_id, stage=stage, reopen_ended=reopen_ended, journal_dir=journal_dir)


def _terminate(client, run_id: str, status: str, why: str = "", stage: Optional[str] = None,
               keep: Optional[str] = None) -> None:
    """Mark the run ended without masking the error that ended it (the server may be gone too).

    `keep`: a FINISHED training a later stage (evaluate, register) added to. That stage says how it ended in its
    stage tag only: the training ended well, and a KILLED run would be refused by every later stage."""
    try:
        if stage:
            client.set_tag(run_id, f"stage.{stage}", status.lower())
        if not keep:
            client.set_terminated(run_id, status)
        log.warning("MLflow run %s: stage %s ended %s%s%s", run_id, stage or "run", status,
                    f" ({why})" if why else "", f"; the run stays {keep}" if keep else "")
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow run %s could not be marked %s: %s", run_id, status, str(exc).splitlines()[0])


@contextlib.contextmanager
def run_context(cfg: Config, *, run_id: Optional[str] = None, run_name: Optional[str] = None,
                tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None,
                stage: Optional[str] = None, reopen_ended: bool = False,
                journal_dir: Optional[Path] = None) -> Iterator[Run]:
    """Open (or reopen) a run; it ends FINISHED, FAILED on an error, KILLED on Ctrl-C/SIGTERM.

    With `stage`, the tag `stage.<stage>` reads started, then finished, failed or killed. A FAILED or
    KILLED run is reopened only with `reopen_ended` (train --resume finishing that training):
    no other stage may turn it into a FINISHED one."""
    client, experiment_id = connect(cfg.tracking)
    uri = tracking_uri(cfg.tracking)
    tags = {**(tags or {}), **({f"stage.{stage}": "started"} if stage else {})}
    if run_id is None:
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        created = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        run_id = created.info.run_id
        keep = None
    else:
        status = client.get_run(run_id).info.status
        # A training's status is its own; stages after it (evaluate, register) never change a FINISHED one.
        keep = "FINISHED" if status == "FINISHED" and stage not in (None, "train") else None
        if status in ("FAILED", "KILLED") and not reopen_ended:
            raise RuntimeError(f"MLflow run {run_id} ended {status}; a later stage will not add to it "
                               "(train again, or `train --resume` to finish that training)")
        if keep is None:  # a later stage adds to a FINISHED training without reopening it: killed, or its server
            client.update_run(run_id, status="RUNNING")  # gone when it fails, it cannot leave that run RUNNING
        if tags:
            Run(client, run_id, experiment_id, uri).set_tags(tags)
    journal = MetricJournal(client, run_id, uri, journal_path(journal_dir, run_id)) if journal_dir else None
    run = Run(client, run_id, experiment_id, uri, journal)
    if journal is not None:
        journal.flush()  # what an earlier attempt of this run could not send
    try:
        yield run
        raise_if_interrupted()
    except Exception:
        _terminate(client, run_id, "FAILED", stage=stage, keep=keep)
        raise
    except BaseException as exc:  # Ctrl-C, SIGTERM (SystemExit, or Prefect's TerminationSignal)
        _terminate(client, run_id, "KILLED", type(exc).__name__, stage=stage, keep=keep)
        raise
    if stage:
        run.set_tags({f"stage.{stage}": "finished"})
    if keep is None:
        ride_out(uri, f"run {run_id}: end", client.set_terminated, run_id, "FINISHED")
