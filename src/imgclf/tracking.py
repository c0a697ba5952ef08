"""MLflow tracking: where the store is, one run per pipeline run, lineage tags, batched metrics.

The run id travels between stages in `<train.out_dir>/run.json`, so the CLI stages,
`dvc repro` and the Prefect flow all add to the same run. Nothing here sets MLflow's
process-wide tracking URI: every call gets an explicit client (see `scoped_tracking_uri`
for the one fluent API the project uses).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import Config, TrackingConfig
from .files import file_lock, read_json_file, write_json

log = logging.getLogger("imgclf")

class TrackingUnavailable(RuntimeError):
    """The tracking store or server cannot be reached; names the URI."""


def tracking_uri(cfg: TrackingConfig) -> str:
    """params, then $MLFLOW_TRACKING_URI, then the embedded SQLite store under tracking.store_dir."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    store = Path(cfg.store_dir).resolve()
    return f"sqlite:///{store}/mlflow.db"


def redact(uri: str) -> str:
    """A URI fit for logs and tags: credentials and query strings removed."""
    import urllib.parse

    parts = urllib.parse.urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def _open_sqlite_store(uri: str):
    """Create or migrate the embedded store under a lock, in WAL mode.

    Two pipelines starting at once on a fresh store would otherwise both run MLflow's
    schema creation and one would die on `table ... already exists`; WAL lets readers
    (the UI, a second run) go on while one process writes.
    """
    import sqlite3

    import mlflow

    db = Path(uri[len("sqlite:///"):])
    with file_lock(db.with_name(db.name + ".lock")):
        con = sqlite3.connect(db, timeout=30)
        try:
            con.execute("PRAGMA journal_mode=WAL")
        finally:
            con.close()
        client = mlflow.MlflowClient(uri, uri)  # creates or migrates the tracking tables
        client.search_registered_models(max_results=1)  # and the registry's
    return client


@contextlib.contextmanager
def scoped_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (mlflow.pytorch.log_model) pointed at `uri` for one block, then restored."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we log the URL ourselves
    with _use_tracking_uri(uri):
        yield


def connect(cfg: TrackingConfig):
    """A client for the configured store (created or migrated if embedded) and the experiment id."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    import mlflow

    client = _open_sqlite_store(uri) if uri.startswith("sqlite:///") else mlflow.MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return client, exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the embedded store, not in ./mlruns
        location = (Path(cfg.store_dir).resolve() / "artifacts").as_uri()
    try:
        return client, client.create_experiment(cfg.experiment, artifact_location=location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def git_state(cwd: str | Path = ".") -> dict[str, str]:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git.commit": "none"}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": str(bool(dirty)).lower()}


def dvc_data_hash(path: str | Path = "data.dvc") -> str:
    """The md5 recorded for the raw data in data.dvc ('none' when not versioned)."""
    try:
        import yaml

        outs = yaml.safe_load(Path(path).read_text()).get("outs", [])
        return str(outs[0].get("md5", "none")) if outs else "none"
    except (OSError, AttributeError, IndexError, ValueError):
        return "none"


def lineage_tags(cfg: Config, processed_sha: dict[str, str], extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    tags = {
        **git_state(),
        "data.dvc_md5": dvc_data_hash(),
        "data.processed_sha256": hashlib.sha256(json.dumps(processed_sha, sort_keys=True).encode()).hexdigest()[:16],
        **{f"data.sha256.{k}": v[:16] for k, v in processed_sha.items()},
        "params.digest": cfg.digest(),
        "model.kind": cfg.model.kind,
        "mlflow.user": getpass.getuser(),
    }
    tags.update(extra or {})
    return tags


def flat_params(cfg: Config) -> dict[str, str]:
    """Every param as MLflow wants it: strings of at most 6000 characters; URIs without secrets."""
    out = {}
    for k, v in cfg.flat().items():
        text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
        if k == "tracking.uri" and v:
            text = redact(v)
        out[k] = text[:6000]
    return out


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
