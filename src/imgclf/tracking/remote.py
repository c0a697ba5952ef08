"""Remote training hand-off through MLflow artifacts, the storage both machines already share.

The pipeline opens the run and uploads the prepared splits (`inputs/processed`); the worker
downloads them, trains into that run, and uploads its outputs (`outputs/train`); the pipeline
downloads those into its own models/ and metrics/ folders and carries on.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ..config import Config
from ..files import read_json_file
from ..layout import Layout
from .lineage import lineage_tags
from .runs import run_name
from .store import connect

INPUTS, OUTPUTS = "inputs/processed", "outputs/train"


def ship_inputs(cfg: Config, tags: dict[str, str]) -> str:
    """Open the pipeline's MLflow run and upload the processed splits; return the run id."""
    client, experiment_id = connect(cfg.tracking)
    layout = Layout.of(cfg)
    sha = read_json_file(layout.meta)["sha256"]
    run = client.create_run(experiment_id, run_name=run_name(cfg),
                            tags={**lineage_tags(cfg, sha, tags), "imgclf.train": "remote"})
    client.log_artifacts(run.info.run_id, str(layout.processed), INPUTS)
    return run.info.run_id


def upload_inputs(cfg: Config, run_id: str) -> None:
    """The processed splits onto an existing run (a sweep's parent run), unless they are there already."""
    client, _ = connect(cfg.tracking)
    if not client.list_artifacts(run_id, INPUTS):
        client.log_artifacts(run_id, str(Layout.of(cfg).processed), INPUTS)


def fetch_inputs(cfg: Config, run_id: str, dest: Path) -> Path:
    client, _ = connect(cfg.tracking)
    return Path(client.download_artifacts(run_id, INPUTS, str(dest)))


def ship_outputs(cfg: Config, run_id: str) -> None:
    client, _ = connect(cfg.tracking)
    for path in Layout.of(cfg).train_outputs():
        client.log_artifact(run_id, str(path), OUTPUTS)


def fetch_outputs(cfg: Config, run_id: str) -> None:
    """Put the worker's outputs where the local evaluate and register stages expect them."""
    client, _ = connect(cfg.tracking)
    with tempfile.TemporaryDirectory() as tmp:
        got = Path(client.download_artifacts(run_id, OUTPUTS, tmp))
        for path in Layout.of(cfg).train_outputs():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got / path.name, path)
