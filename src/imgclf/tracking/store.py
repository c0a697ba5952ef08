"""MLflow tracking store: where it is, whether it answers, an explicit client for it.

Nothing here sets MLflow's process-wide tracking URI: every call gets an explicit client
(see `scoped_tracking_uri` for the one fluent API the project uses). Runs live in runs.py.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from ..config import Tracking
from ..layout import kept_by_the_checkout
from ..urls import redact
from .mlflow_internals import open_sqlite_store, scoped_tracking_uri
from .ui_view import VIEW_TAG, view_state

log = logging.getLogger("imgclf")


class TrackingUnavailable(RuntimeError):
    """The tracking store or server cannot be reached; names the URI."""


def tracking_uri(cfg: Tracking) -> str:
    """params, then $MLFLOW_TRACKING_URI, then the embedded SQLite store under paths.mlflow_dir."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    store = kept_by_the_checkout(cfg.store_dir)
    return f"sqlite:///{store}/mlflow.db"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any work, when the tracking server does not answer. /health needs no login, so the
    URI is asked without its credentials (a password holding '/' would otherwise surface in urllib's error)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(redact(uri).rstrip("/") + "/health", timeout=timeout) as resp:
                if resp.status != 200:
                    raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} answered HTTP {resp.status}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise TrackingUnavailable(f"MLflow tracking server {redact(uri)} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def ui_base(uri: str) -> Optional[str]:
    """The MLflow UI's address for a tracking server URI; None for an embedded store (see `imgclf ui`)."""
    return redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else None


# MLflow 3's UI opens in GenAI mode (no model registry in its menu) unless the link or the browser's last
# choice says otherwise: our links say "model training".
ML_VIEW = "?workflowType=machine_learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def run_route(experiment_id: str, run_id: str) -> str:
    return f"/#/experiments/{experiment_id}/runs/{run_id}{ML_VIEW}"


def logged_model_route(experiment_id: str, model_id: str) -> str:
    """A logged model's page: its test metrics with the dataset they were measured on, its registered versions."""
    return f"/#/experiments/{experiment_id}/models/{model_id}{ML_VIEW}"


def experiment_models_route(experiment_id: str) -> str:
    """The experiment's Models tab: every logged model with its test metrics, and its registered versions."""
    return f"/#/experiments/{experiment_id}/models{ML_VIEW}"


def version_route(name: str, version: str) -> str:
    import urllib.parse

    return f"/#/models/{urllib.parse.quote(name, safe='')}/versions/{version}{ML_VIEW}"


def page(uri: str, route: str) -> str:
    """A link to a UI route, or how to open it when the store is embedded."""
    base = ui_base(uri)
    return f"{base}{route}" if base else f"`imgclf ui`, then http://127.0.0.1:5000{route}"


# MLflow's own client settings, unless the user set them: a call to an unreachable server gives up
# within about 30 s (3 tries of at most 8 s, 1 s and 2 s apart) instead of blocking for minutes.
CLIENT_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                         "MLFLOW_HTTP_REQUEST_TIMEOUT": "8"}


def experiment_tags() -> dict[str, str]:
    """The model-training kind, and the saved view our links open (see ui_view)."""
    return {**EXPERIMENT_KIND, VIEW_TAG: view_state()}


def connect(cfg: Tracking):
    """A client for the configured store (created or migrated if embedded) and the experiment id."""
    for key, value in CLIENT_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    uri = tracking_uri(cfg)
    check_reachable(uri)
    import mlflow

    client = open_sqlite_store(uri) if uri.startswith("sqlite:///") else mlflow.MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        for key, value in experiment_tags().items():
            if key not in exp.tags or (key == VIEW_TAG and exp.tags[key] != value):  # older version, or by hand
                client.set_experiment_tag(exp.experiment_id, key, value)
        return client, exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the embedded store, not in ./mlruns
        location = (kept_by_the_checkout(cfg.store_dir) / "artifacts").as_uri()
    try:
        return client, client.create_experiment(cfg.experiment, artifact_location=location, tags=experiment_tags())
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


def registered_models_summary(uri: str) -> str:
    """One clause listing the registered models and their aliases, for errors that must say what exists."""
    try:
        import mlflow

        with scoped_tracking_uri(uri):
            models = mlflow.MlflowClient(uri, uri).search_registered_models(max_results=50)
    except Exception as exc:  # the error being explained matters more than this list
        return f"the registered models could not be listed ({type(exc).__name__})"
    if not models:
        return f"no model is registered in {redact(uri)}"
    listed = [m.name + (" (" + ", ".join(f"{a} v{v}" for a, v in sorted(m.aliases.items())) + ")" if m.aliases else "")
              for m in models]
    return "registered models: " + ", ".join(listed)
