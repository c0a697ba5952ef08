"""The reference a batch is compared with: a seeded sample of the validation split the model was trained
beside, scored by the same model. The split must be the one the model's MLflow run recorded (its sha256
tag): comparing with another data set's statistics would call every batch drifted, or none."""

from __future__ import annotations

import logging
import re
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..config import Config
from ..data.batches import load_split, read_meta
from ..data.datasource import data_source
from ..layout import Layout
from .drift import Profile, image_features
from .embeddings import score

log = logging.getLogger("imgclf")
VAL = "val.pt"


class ReferenceMismatch(ValueError):
    """The local validation split is not the model's training data."""


def model_run(cfg: Config, model_uri: str) -> Optional[tuple[str, dict[str, str]]]:
    """The id and tags of the MLflow run that logged the model (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/ID/...);
    None for a model folder, which has no run."""
    from ..tracking.store import connect

    m = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w-]+))", model_uri)
    run = re.fullmatch(r"runs:/([0-9a-f]+)/.*", model_uri)
    if not (m or run):
        return None
    client, _ = connect(cfg.tracking)
    if m:
        name, version, alias = m.groups()
        mv = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
        run_id = mv.run_id
    else:
        run_id = run.group(1)
    return (run_id, dict(client.get_run(run_id).data.tags)) if run_id else None


def check_lineage(cfg: Config, model_uri: str, meta: dict, tags: Optional[dict[str, str]]) -> bool:
    """True when the model's run recorded this validation split; False (with a warning) when nothing says which
    split it was; a split other than the recorded one is refused."""
    recorded = (tags or {}).get(f"data.sha256.{VAL}")
    local = (meta.get("sha256") or {}).get(VAL, "")
    if tags is None:
        log.warning("%s: no training run to compare with (a model folder, or tracking off); cannot confirm %s is "
                    "its training data", model_uri, Layout.of(cfg).split("val"))
    elif recorded is None:
        log.warning("%s: no data.sha256.%s tag on its run; cannot confirm %s is its training data",
                    model_uri, VAL, Layout.of(cfg).split("val"))
    elif not local.startswith(recorded):
        raise ReferenceMismatch(
            f"{Layout.of(cfg).split('val')}: sha256 {local[:16]} is not the validation split {model_uri} was trained "
            f"beside ({recorded}); prepare that data version (git checkout + dvc checkout/pull), or set "
            "monitor.drift.enabled=false to score without a drift check")
    return recorded is not None


def original_sizes(cfg: Config, ids: list[str]) -> Optional[np.ndarray]:
    """Width and height of an ImageFolder's snapshot files, read from their headers; None for other sources."""
    source = data_source(cfg.data.source)
    if not source.takes_link:  # only ImageFolders keep files with sizes of their own
        return None
    root = Layout.of(cfg).raw_root / source.name
    sizes = []
    for i in ids:
        p = root / i
        if not p.is_file():
            return None
        with Image.open(p) as im:
            sizes.append(im.size)
    return np.array(sizes, dtype=np.float64)


def reference_profile(cfg: Config, network: torch.nn.Module, temperature: float, classes: list[str], model_uri: str,
                      run_tags: Optional[dict[str, str]], with_sizes: bool) -> tuple[Profile, bool]:
    """The reference profile, and whether its split is the one the model's run recorded."""
    layout = Layout.of(cfg)
    meta = read_meta(layout.meta, cfg.data)
    if list(meta.get("classes") or []) != list(classes):
        raise ReferenceMismatch(f"{layout.meta}: classes {meta.get('classes')} are not the model's {classes}; "
                                f"{model_uri} was trained on other data (set data.source / data.path to its data)")
    verified = check_lineage(cfg, model_uri, meta, run_tags)
    split = load_split(layout.split("val"), mmap=True)
    pick = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(cfg.train.seed))
    pick = pick[: cfg.monitor.reference_size].sort().values
    images = split.images[pick].numpy()
    probs, emb = score(network, temperature, images, cfg.runtime.eval_batch_size)
    sizes = original_sizes(cfg, [split.ids[i] for i in pick.tolist()]) if with_sizes and split.ids else None
    return Profile(image_features(images, sizes), emb, probs.argmax(1)), verified
