"""MLflow tracking store: where it is, whether it answers, an explicit client for it.

Nothing here sets MLflow's process-wide tracking URI: every call gets an explicit client
(see `scoped_tracking_uri` for the one fluent API the project uses). Runs live in runs.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from .config import TrackingConfig
from .files import file_lock

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
