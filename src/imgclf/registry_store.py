"""The model registry read without its client: a registered model's folder found in the embedded store's
own tables (SQL against MLflow's schema, kept here alone), and the list of registered models for errors.

`imgclf predict` on one machine then need not import the MLflow client (seconds on a small machine).
"""

from __future__ import annotations

from pathlib import Path

from .tracking import redact, scoped_tracking_uri


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
