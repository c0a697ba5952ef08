"""One trial, where it runs (a local worker process, or a Prefect worker in the train pool): the training of
its config into its pre-made MLflow child run, with the study's pruner asked after every epoch.

The spec is plain JSON (params, overrides, ids), so the same function runs behind a process pool or a
deployment's parameters.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from ..config import from_dict

METRICS = {"val_acc": "kept_val_acc", "val_loss": "kept_val_loss"}


def trial_spec(*, study: str, storage: str, trial_id: int, number: int, params: dict, overrides: dict,
               run_id: Optional[str], parent_run_id: str, tags: dict[str, str], max_epochs: int) -> dict[str, Any]:
    return {"study": study, "storage": storage, "trial_id": trial_id, "number": number, "params": params,
            "overrides": overrides, "run_id": run_id, "parent_run_id": parent_run_id, "tags": tags,
            "max_epochs": max_epochs}


def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the trial; its value is the kept weights' validation metric. A pruned trial ends its training
    after the epoch the pruner rejected, and its run ends FINISHED (the caller tags it pruned)."""
    import optuna

    from ..stages.train import TrialControl, train_stage
    from .study import load_for_trial

    start = time.perf_counter()
    cfg = from_dict(spec["params"], spec["overrides"])
    metric = cfg.sweep.metric
    study = load_for_trial(cfg, spec["storage"], spec["study"], spec["max_epochs"])
    trial = optuna.trial.Trial(study, spec["trial_id"])

    def stop(record: dict[str, Any]) -> Optional[str]:
        value, epoch = float(record[metric]), int(record["epoch"])
        trial.report(value, epoch)
        if trial.should_prune():
            return f"pruned by the {cfg.sweep.pruner} pruner ({metric} {value:.4f} at epoch {epoch})"
        return None

    summary = train_stage(cfg, run_id=spec["run_id"], parent_run_id=spec["parent_run_id"], extra_tags=spec["tags"],
                          trial=TrialControl(subset=cfg.sweep.train_subset, stop=stop))
    return trial_result(summary, metric, spec["number"], time.perf_counter() - start)


def trial_result(summary: dict[str, Any], metric: str, number: int, wall: float) -> dict[str, Any]:
    """From the train stage's summary (metrics/train.json): a trial the pruner stopped says why in stopped_by."""
    return {"number": number, "state": "pruned" if summary.get("stopped_by") else "complete",
            "value": float(summary[METRICS[metric]]), "epochs": summary["epochs_run"],
            "fit_s": float(summary["train_seconds"]), "wall_s": wall, "run_id": summary.get("run_id"),
            "kept_epoch": summary["kept_epoch"]}
