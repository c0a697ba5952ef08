"""audit: the prepared data's own mistakes, for a person to review: suspected label errors (audit/label_issues.py)
and near-duplicate images (audit/near_duplicates.py), ranked, drawn and written to paths.audit_dir."""

from __future__ import annotations

import logging
import time
from typing import Optional

from ..config import Config
from ..layout import Layout
from . import holds_outputs, records_in_dvc_lock

log = logging.getLogger("imgclf")

SPLITS = ("train", "val", "test")
OUTPUTS = ("label_issues.csv", "label_issues.png", "near_duplicates.csv", "near_duplicates.png", "audit.json")


def _fold_trainer(cfg: Config, meta: dict, device):
    """train_fold for audit/label_issues.cross_validate: audit.recipe's model and schedule, seeded per fold."""
    from ..config import from_dict
    from ..data.batches import Batches
    from ..models.classifier import build_model
    from ..training.epoch import Hooks
    from ..training.loop import fit
    from ..training.recipes import recipe

    overrides = recipe(cfg.audit.recipe)
    norm = meta["normalization"]
    # The recipe over the code's defaults, never over the params' model and train sections: the audit of one
    # data set is the same whatever model the pipeline trains (and dvc.yaml's audit stage reads neither).
    base = {k: v for k, v in cfg.to_dict().items() if k in ("data", "runtime", "paths")}

    def train_fold(train, held_out, fold: int):
        import torch

        fold_cfg = from_dict(base, {**overrides, "train.seed": cfg.audit.seed + fold})
        torch.manual_seed(cfg.audit.seed + fold)
        model = build_model(fold_cfg.model, tuple(meta["image_shape"]), len(meta["classes"]), norm["mean"],
                            norm["std"]).to(device)
        fit(model, Batches(train, device), Batches(held_out, device), fold_cfg.train,
            hooks=Hooks(log=lambda line: log.info("audit fold %d: %s", fold + 1, line)))
        return model.eval()

    return train_fold


@holds_outputs("audit")
@records_in_dvc_lock("audit")
def audit_stage(cfg: Config, extra_tags: Optional[dict[str, str]] = None) -> dict:
    """Cross-validate audit.recipe over train + validation, rank the suspected label errors of every split with
    confident learning, group near-duplicate images, and write the tables and pictures (one run of kind audit
    in MLflow when tracking is on)."""
    import numpy as np
    import torch

    from ..audit import near_duplicates
    from ..audit.label_issues import cross_validate, score_splits
    from ..audit.report import summary_line, write_outputs
    from ..data.batches import Split, load_split, read_meta
    from ..files import atomic_dir
    from ..progress import heartbeat
    from ..training.runtime import resolve_device, set_threads

    start = time.perf_counter()
    layout = Layout.of(cfg)
    meta = read_meta(layout.meta, cfg.data)
    splits = {name: load_split(layout.split(name)) for name in SPLITS}
    set_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    pool = Split(torch.cat([splits["train"].images, splits["val"].images]),
                 torch.cat([splits["train"].labels, splits["val"].labels]))
    with heartbeat(log.info, "audit: cross-validating the label checks") as step:
        pool_probs, test_probs = cross_validate(pool, splits["test"], cfg.audit.folds, cfg.audit.seed,
                                                _fold_trainer(cfg, meta, device), device, step)
        cv_s = time.perf_counter() - start
        n_train = len(splits["train"])
        scored = score_splits(splits, {"train": pool_probs[:n_train], "val": pool_probs[n_train:], "test": test_probs})
        step("audit: looking for near-duplicate images")
        every = torch.cat([splits[n].images for n in SPLITS])
        groups = near_duplicates.find(every, cfg.audit.near_duplicate_threshold)
        step("audit: drawing the pictures")
        split_of = np.concatenate([[n] * len(splits[n]) for n in SPLITS])
        with atomic_dir(layout.audit, lambda names: names <= set(OUTPUTS), "only " + ", ".join(OUTPUTS)) as tmp:
            # No timings in the files: the same data and settings write the same bytes.
            record = write_outputs(tmp, scored, groups, every.numpy(), split_of, meta["classes"], cfg.audit.shown,
                                   {"folds": cfg.audit.folds, "recipe": cfg.audit.recipe, "seed": cfg.audit.seed,
                                    "near_duplicate_threshold": cfg.audit.near_duplicate_threshold,
                                    "data_sha256": meta["sha256"]})
    record.update(cross_validation_seconds=round(cv_s, 3), seconds=round(time.perf_counter() - start, 3))
    log.info("audit: %s in %.1f s (%s)", summary_line(record), record["seconds"], layout.audit)
    if cfg.tracking.enabled:
        _track(cfg, layout, meta, record, extra_tags)
    return {**{k: v for k, v in record.items() if k != "top"}, "audit_dir": str(layout.audit)}


def accept(cfg: Config, n: int) -> dict:
    """The first `n` rows of the last audit's label_issues.csv as corrections (relabel to the suggested
    class) in data.corrections, skipping ids it already corrects; prepare applies them on its next run."""
    import csv
    import getpass

    from ..data.batches import read_meta
    from ..data.corrections import Correction, append
    from ..files import read_json_file

    layout = Layout.of(cfg)
    table = layout.audit / "label_issues.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no audit here yet; run `imgclf audit` first")
    if not cfg.data.corrections:
        raise ValueError("data.corrections: null, so there is no corrections file to write; set a path")
    record = read_meta(layout.meta, cfg.data)
    audited = read_json_file(layout.audit / "audit.json") if (layout.audit / "audit.json").is_file() else None
    if audited and audited.get("data_sha256") != record["sha256"]:
        raise ValueError(f"{table}: the audit of other prepared data than {layout.processed} (prepared again since); "
                         "run `imgclf audit` again before accepting its rows")
    classes = record["classes"]
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    who = getpass.getuser()
    wanted = [Correction(r["id"], classes.index(r["suggested"]),
                         f"audit rank {r['rank']}: given {r['given']}, suggested {r['suggested']} (p(given) {r['score']})",
                         who) for r in rows]
    added = append(cfg.data.corrections, wanted, classes)
    log.info("audit: %d correction(s) added to %s (%d already there); `imgclf prepare` (or dvc repro) applies them",
             len(added), cfg.data.corrections, len(wanted) - len(added))
    return {"corrections": cfg.data.corrections, "added": len(added), "already_there": len(wanted) - len(added),
            "ids": [c.id for c in added]}


def _track(cfg: Config, layout: Layout, meta: dict, record: dict, extra_tags: Optional[dict[str, str]]) -> None:
    """One MLflow run of kind audit, in <experiment>-audit, tagged with the data's digest."""
    import dataclasses

    from ..tracking.lineage import processed_digest
    from ..tracking.runs import run_context

    where = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, tracking=dataclasses.replace(
        cfg.runtime.tracking, experiment=f"{cfg.runtime.tracking.experiment}-audit")))
    tags = {"run_kind": "audit", "data.processed_sha256": processed_digest(meta["sha256"]),
            "data.source": cfg.data.source, "audit.recipe": cfg.audit.recipe, **(extra_tags or {})}
    with run_context(where, run_name=f"audit {cfg.data.source} {time.strftime('%Y%m%d-%H%M%S')}", tags=tags) as run:
        run.log_metrics({"label_issues": record["label_issues"], "near_duplicate_groups": record["near_duplicate_groups"],
                         "near_duplicate_groups_across_splits": record["across_splits"],
                         **{f"label_issues.{k}": v for k, v in record["label_issues_by_split"].items()},
                         "seconds": record["seconds"], "cross_validation_seconds": record["cross_validation_seconds"]})
        for name in OUTPUTS:
            run.log_artifact(layout.audit / name, "audit")
        record["mlflow_run_id"] = run.run_id
