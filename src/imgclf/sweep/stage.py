"""sweep: a hyperparameter search over sweep.space, one MLflow parent run with a child run per trial, the best
trial through evaluate and the same promotion gate as any pipeline run. Serves `imgclf sweep` and the
hyperparameter-sweep flow alike (the flow passes a launcher that runs trials on the train pool)."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config import Config, from_dict
from ..schema import ConfigError, build
from ..urls import redact
from .settings import SweepConfig
from .space import best_trial

log = logging.getLogger("imgclf")


def sweep_stage(cfg: Config, raw: dict, overrides: dict[str, Any], *, trials: Optional[int] = None,
                parallel: Optional[int] = None, launcher=None, tags: Optional[dict[str, str]] = None) -> dict:
    """Run (or go on with) the study until it holds `trials` finished trials; returns the sweep's record."""
    start = time.perf_counter()
    if not cfg.tracking.enabled:
        raise ConfigError("runtime.tracking.enabled: a sweep records its trials in MLflow (set it to true)")
    # --trials and --parallel within sweep.trials' and sweep.parallel's own bounds (the one place they are written)
    given = {k: v for k, v in (("trials", trials), ("parallel", parallel)) if v is not None}
    checked = build(SweepConfig, {**dataclasses.asdict(cfg.sweep), **given}, "sweep")
    trials, parallel = checked.trials, checked.parallel
    if not cfg.sweep.space:
        raise ConfigError("sweep.space: empty; name the keys to search (see params.yaml)")
    cfg.sweep.check_kind(cfg.model.kind)
    from ..data.batches import read_meta
    from ..layout import Layout
    from ..training.runtime import available_cores
    from .local import LocalLauncher
    from .runner import Sweep

    if launcher is None and parallel > available_cores():  # local trials share the cores: one each at least
        log.warning("sweep: %d trials at once on %d cores; running %d at once", parallel, available_cores(),
                    available_cores())
        parallel = available_cores()

    # The prepared data first: no trial should find it missing alone, and a study goes on only on the same data.
    data = read_meta(Layout.of(cfg).meta, cfg.data)["sha256"]
    launcher = launcher or LocalLauncher(parallel)
    try:
        sweep = Sweep(cfg, raw, overrides, launcher, data, trials=trials, parallel=parallel, tags=tags)
    except BaseException:
        launcher.close(abort=True)
        raise
    parent = _parent_run(sweep)
    log.info("sweep %s: %d trials, %d at once, study in %s; MLflow parent run %s", sweep.name, trials, parallel,
             redact(sweep.url), parent)
    try:
        sweep.run(parent)
        record = _finish(sweep, parent)
        if cfg.sweep.register:
            record["registry"] = _register_best(sweep, tags or {})
            sweep.client.set_tag(parent, "sweep.registered", json.dumps(record["registry"]))
    except Exception:
        sweep.client.set_terminated(parent, "FAILED")
        raise
    except BaseException:
        sweep.client.set_terminated(parent, "KILLED")
        raise
    sweep.client.set_terminated(parent, "FINISHED")
    return {**record, "seconds": round(time.perf_counter() - start, 3)}


def _parent_run(sweep) -> str:
    """The study's parent run (reopened when a sweep goes on in the same tracking store), else a new one."""
    from mlflow.entities import Param

    from ..tracking.lineage import flat_params
    from ..tracking.store import tracking_uri

    attrs, store = sweep.study.user_attrs, redact(tracking_uri(sweep.cfg.tracking))
    run_id = attrs.get("mlflow.parent_run_id")
    if run_id and attrs.get("mlflow.store") == store:
        try:
            sweep.client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception as exc:  # noqa: BLE001 - deleted by hand: a new parent run
            log.warning("sweep %s: parent run %s is gone (%s); starting a new one", sweep.name, run_id, exc)
    run = sweep.client.create_run(sweep.experiment_id, run_name=f"sweep-{sweep.name}", tags={
        **sweep.tags, "sweep.study": sweep.name, "sweep.storage": redact(sweep.url), "sweep.role": "parent"})
    settings = {f"sweep.{k}": json.dumps(v) if isinstance(v, dict) else str(v)
                for k, v in sweep.cfg.sweep.identity().items()}
    sweep.client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in
                                                    {**flat_params(sweep.cfg), **settings}.items()])
    sweep.study.set_user_attr("mlflow.parent_run_id", run.info.run_id)
    sweep.study.set_user_attr("mlflow.store", store)
    return run.info.run_id


def _finish(sweep, parent: str) -> dict:
    """Table, pictures and the best trial on the parent run; the record the CLI prints and the flow reports."""
    from optuna.trial import TrialState

    from ..tracking.store import page, run_route, tracking_uri
    from . import report

    study, client = sweep.study, sweep.client
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = best_trial(study, sweep.dims)
    if not complete or best is None:
        raise RuntimeError(f"sweep {sweep.name}: no trial completed (see the trials' MLflow runs)")
    uri = tracking_uri(sweep.cfg.tracking)

    def link(run_id: str) -> str:
        return page(uri, run_route(sweep.experiment_id, run_id))

    table = report.markdown(study, sweep.cfg.sweep.metric, 10, link)
    with tempfile.TemporaryDirectory(prefix="imgclf-sweep-") as tmp:
        report.write_table(study, Path(tmp) / "trials.csv")
        pictures = report.pictures(study, Path(tmp))
        (Path(tmp) / "top_trials.md").write_text(table)
        client.log_artifacts(parent, tmp, "sweep")
    rows = report.rows(study)
    overheads = [r["overhead_s"] for r in rows if r["overhead_s"] is not None]
    states = [r["state"] for r in rows]
    metrics = {"best_value": best.value, "trials_complete": states.count("complete"),
               "trials_pruned": states.count("pruned"), "trials_failed": states.count("fail")}
    if overheads:
        metrics |= {"overhead_mean_s": statistics.fmean(overheads), "overhead_median_s": statistics.median(overheads)}
    from mlflow.entities import Metric, RunTag

    ts = int(time.time() * 1000)
    client.log_batch(parent, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()], tags=[
        RunTag("sweep.best_trial", str(best.number)), RunTag("sweep.best_run_id", best.user_attrs["mlflow_run_id"]),
        RunTag("mlflow.note.content", f"Best trial {best.number}: {sweep.cfg.sweep.metric} {best.value:.4f}\n\n"
                                      + table),
        *[RunTag(f"best.{k}", str(v)) for k, v in best.params.items()]])
    baseline = next((r for r in rows if r["baseline"] and r["state"] == "complete"), None)
    return {"study": sweep.name, "storage": redact(sweep.url), "parent_run_id": parent,
            "parent_run": link(parent), "metric": sweep.cfg.sweep.metric, "best_trial": best.number,
            "best_value": best.value, "best_params": best.params, "best_run_id": best.user_attrs["mlflow_run_id"],
            "baseline_value": baseline["value"] if baseline else None, "metrics": metrics,
            "worker_start_s": sweep.worker_start_s,
            "pictures": [p.name for p in pictures], "top_trials": table, "trials": rows}


def _register_best(sweep, tags: dict[str, str]) -> dict:
    """The best trial's model through evaluate (the test split) and the registry gate, once per best trial."""
    from ..stages.evaluate import evaluate_stage
    from ..stages.register import register_stage

    best = best_trial(sweep.study, sweep.dims)
    done = sweep.study.user_attrs.get("registered") or {}
    if done.get("trial") == best.number:
        log.info("sweep %s: trial %d is registered already (%s v%s)", sweep.name, best.number, done.get("model"),
                 done.get("version"))
        return done
    cfg = from_dict(sweep.raw, sweep.trial_overrides(best.number, best.params))
    evaluation = evaluate_stage(cfg, tags)
    registered = register_stage(cfg, tags)
    record = {"trial": best.number, "model": registered["model"], "version": registered["version"],
              "promoted": registered["promoted"], "reason": registered["reason"],
              "test_accuracy": evaluation["accuracy"], "test_macro_f1": evaluation["macro_f1"]}
    sweep.study.set_user_attr("registered", record)
    return record
