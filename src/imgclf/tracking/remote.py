"""Remote training hand-off through MLflow artifacts, the storage both machines already share.

The pipeline opens the run and uploads the prepared splits (`inputs/processed`); the worker
downloads them, trains into that run, and uploads its outputs (`outputs/train`); the pipeline
downloads those into its own models/ and metrics/ folders and carries on.

While it trains, the worker also uploads each epoch's checkpoint (`checkpoints/`): a worker that dies
(a pre-empted machine, an OOM kill) leaves the run everything another worker needs to resume it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ..config import Config
from ..files import read_json_file, sha256_file
from ..layout import Layout
from .lineage import lineage_tags
from .runs import run_name
from .store import connect

INPUTS, OUTPUTS, CHECKPOINTS = "inputs/processed", "outputs/train", "checkpoints"
# The run's tags that name its last checkpoint uploaded in full: the artifact path, its epoch and its sha256.
CHECKPOINT_TAG, CHECKPOINT_EPOCH_TAG, CHECKPOINT_SHA_TAG = ("train.checkpoint", "train.checkpoint_epoch",
                                                            "train.checkpoint_sha256")


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


def upload_checkpoint(client, run_id: str, path: Path, epoch: int) -> None:
    """An epoch's checkpoint into the run's artifacts. Two slots, written in turn, and the tags are moved only
    once an upload is whole: a worker killed mid-upload leaves the other slot, and the tags naming it, intact."""
    from mlflow.entities import RunTag

    digest = sha256_file(path)
    slot = f"{CHECKPOINTS}/slot-{epoch % 2}"
    client.log_artifact(run_id, str(path), slot)
    client.log_batch(run_id, tags=[RunTag(CHECKPOINT_TAG, f"{slot}/{path.name}"),
                                   RunTag(CHECKPOINT_EPOCH_TAG, str(epoch)), RunTag(CHECKPOINT_SHA_TAG, digest)])


def fetch_checkpoint(cfg: Config, run_id: str, dest: Path) -> Optional[int]:
    """The run's last uploaded checkpoint, verified, at `dest`; its epoch, or None when the run has none."""
    client, _ = connect(cfg.tracking)
    tags = client.get_run(run_id).data.tags
    if CHECKPOINT_TAG not in tags:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        got = Path(client.download_artifacts(run_id, tags[CHECKPOINT_TAG], tmp))
        if sha256_file(got) != tags.get(CHECKPOINT_SHA_TAG):
            raise ValueError(f"MLflow run {run_id}: artifact {tags[CHECKPOINT_TAG]} does not match its tag "
                             f"{CHECKPOINT_SHA_TAG}; not resuming from it (delete the tag {CHECKPOINT_TAG} to start over)")
        os.replace(got, dest)
    return int(tags[CHECKPOINT_EPOCH_TAG])


def end_abandoned(cfg: Config, run_id: str, why: str) -> None:
    """A run whose training was given up (its last worker lost, no retry left): FAILED, with why, unless a
    worker ended it itself."""
    client, _ = connect(cfg.tracking)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, "stage.train", "failed")
        client.set_tag(run_id, "train.abandoned", why[:500])
        client.set_terminated(run_id, "FAILED")


def tag_run(cfg: Config, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client, _ = connect(cfg.tracking)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
