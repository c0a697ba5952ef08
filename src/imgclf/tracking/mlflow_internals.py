"""Every use of MLflow's private APIs and of its database tables, in one place.

What is here leans on names MLflow does not promise to keep (underscored modules and attributes, the
SQLite schema); pyproject.toml bounds mlflow's version, and a new MLflow is checked against this module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

from ..locks import file_lock


def open_sqlite_store(uri: str):
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
    """MLflow's fluent API (mlflow.pytorch.log_model) pointed at `uri` for one block; afterwards its
    global URI and $MLFLOW_TRACKING_URI are as before (MLflow's own helper unsets the variable)."""
    from mlflow.tracking._tracking_service import utils

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # we log the URL ourselves
    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), utils._tracking_uri
    utils.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def embedded_model_folder(uri: str, tracking_uri: str) -> tuple[Path, str] | None:
    """A registered model's folder and version in the embedded SQLite store, read from the store's own tables.

    None unless the store is a local SQLite file whose tables look as expected and the folder is a
    local one: the caller then asks MLflow, which also gives the proper error for a missing model.
    """
    import re
    import sqlite3
    import urllib.parse
    import urllib.request

    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w.-]+)|/(\d+))", uri)
    if not m or not tracking_uri.startswith("sqlite:///"):
        return None
    name, alias, version = m.groups()
    db = Path(tracking_uri[len("sqlite:///"):])
    if not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            if alias:
                row = con.execute("SELECT version FROM registered_model_aliases WHERE workspace = 'default' "
                                  "AND name = ? AND alias = ?", (name, alias)).fetchone()
                version = row[0] if row else None
            row = con.execute("SELECT storage_location FROM model_versions WHERE workspace = 'default' AND "
                              "name = ? AND version = ? AND status = 'READY' AND "
                              "coalesce(current_stage, '') != 'Deleted_Internal'", (name, version)).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # another MLflow schema: let MLflow itself resolve the URI
        return None
    if not row or not str(row[0]).startswith("file://"):
        return None
    folder = Path(urllib.request.url2pathname(urllib.parse.urlparse(row[0]).path))
    return (folder, str(version)) if folder.is_dir() else None


def artifact_repository(uri: str, tracking_uri: str):
    """The artifact repository behind a runs:/ or models:/ URI, resolved with this store (no global URI)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri, tracking_uri=tracking_uri, registry_uri=tracking_uri)


def model_id_of(model_uri: str) -> Optional[str]:
    """The logged-model id in a models:/m-<id> URI (None for other URIs)."""
    from mlflow.store.artifact.utils.models import _parse_model_id_if_present

    return _parse_model_id_if_present(model_uri)


def registry_uri(client) -> str:
    return str(getattr(client, "_registry_uri", ""))


def serve_tracking_app(host: str, port: int, auth: bool) -> None:
    """What `mlflow server` does, in this process: its CLI imports all of MLflow (15 s on 2 cores) only to start
    a uvicorn child that imports it all again. The store and artifact settings come from the environment
    (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_ALLOWED_HOSTS), as for the CLI."""
    import uuid

    import uvicorn
    from mlflow.server import constants as c

    backend, destination = os.environ["MLFLOW_BACKEND_STORE_URI"], os.environ["MLFLOW_ARTIFACTS_DESTINATION"]
    os.environ.update({c.BACKEND_STORE_URI_ENV_VAR: backend, c.REGISTRY_STORE_URI_ENV_VAR: backend,
                       c.ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/", c.SERVE_ARTIFACTS_ENV_VAR: "true",
                       c.ARTIFACTS_DESTINATION_ENV_VAR: destination, "_MLFLOW_SGI_NAME": "uvicorn",
                       "_MLFLOW_SERVER_BOOT_ID": uuid.uuid4().hex, "_MLFLOW_IN_JOB_EXECUTOR": "false",
                       "MLFLOW_ENABLE_WORKSPACES": "false"})
    from mlflow.server import _bootstrap_basic_auth
    from mlflow.server.handlers import initialize_backend_stores

    initialize_backend_stores(backend, backend, "mlflow-artifacts:/")
    app = "mlflow.server.fastapi_app:app"
    if auth:
        _bootstrap_basic_auth()
        os.environ["_MLFLOW_AUTH_ADMIN_BOOTSTRAPPED"] = "true"
        app = "mlflow.server.auth:create_app"
    log_config = Path(c.__file__).with_name("uvicorn_log_config.yaml")
    uvicorn.run(app, host=host, port=port, factory=auth, workers=1,
                log_config=str(log_config) if log_config.is_file() else None)


def embedded_experiment_id(uri: str, name: str) -> Optional[str]:
    """The experiment's id read from the embedded store's table, without importing MLflow (None if absent)."""
    import sqlite3

    if not uri.startswith("sqlite:///") or not os.path.isfile(uri[len("sqlite:///"):]):
        return None
    try:
        with sqlite3.connect(f"file:{uri[len('sqlite:///'):]}?mode=ro", uri=True) as db:
            row = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None
