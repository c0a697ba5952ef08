"""The `hyperparameter-sweep` flow: download → prepare → an Optuna sweep (imgclf.sweep.stage) whose trials run
as local processes, or, with `runtime.orchestration.train_pool` set, as child flow runs of `train/<pool>` (one
training per worker; the pool's concurrency limit holds them back), then a markdown report of the best trials."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.deployments import run_deployment

from flows.pipeline import flow_run_tags, follow_train_run, load_config
from imgclf import config
from imgclf.config.params_file import read_params
from imgclf.files import read_json_file
from imgclf.layout import Layout
from imgclf.sweep.trial import trial_result
from imgclf.tracking import remote
from tasks import stages as stage_tasks


class PoolLauncher:
    """Each trial a run of the `train/<pool>` deployment; its result is read back from its MLflow run (a
    flow run's return value would need result storage shared with the worker)."""

    def __init__(self, cfg: config.Config, parallel: int):
        self.cfg, self.pool = cfg, cfg.runtime.orchestration.train_pool
        self.threads = ThreadPoolExecutor(parallel, thread_name_prefix="sweep-trial")
        self.shipped, self.lock = set(), threading.Lock()

    def overrides(self) -> dict[str, Any]:
        return {}

    def submit(self, spec: dict[str, Any]) -> Future:
        # The flow run's context goes with the trial, so each deployment run is a child of this flow run.
        return self.threads.submit(contextvars.copy_context().run, self._run, spec)

    def _run(self, spec: dict[str, Any]) -> dict[str, Any]:
        with self.lock:  # the splits go up once, to the sweep's parent run, where every worker fetches them
            if spec["parent_run_id"] not in self.shipped:
                remote.upload_inputs(self.cfg, spec["parent_run_id"])
                self.shipped.add(spec["parent_run_id"])
        orchestration = self.cfg.runtime.orchestration
        child = run_deployment(f"train/{self.pool}", parameters={
            "params": spec["params"], "overrides": spec["overrides"], "run_id": spec["run_id"], "trial": spec},
            timeout=0)
        # A trial whose worker is lost is marked Crashed and fails (the study goes on; a rerun adds the trials
        # missing) rather than wait for a run that will never end.
        child = follow_train_run(child.id, get_run_logger(), orchestration.train_timeout_s,
                                 lost_after=orchestration.train_lost_after_s, relay=False)
        if not child.state or not child.state.is_completed():
            raise RuntimeError(f"trial {spec['number']}: train flow run {child.name} ({child.id}) in pool {self.pool} "
                               f"ended {child.state.name if child.state else 'without a state'}")
        trial_cfg = config.from_dict(spec["params"], spec["overrides"])
        remote.fetch_outputs(trial_cfg, spec["run_id"])  # the trial's folders here, for evaluate if it is the best
        summary = read_json_file(Layout.of(trial_cfg).train_summary)
        return trial_result(summary, trial_cfg.sweep.metric, spec["number"], 0.0)

    def close(self, abort: bool = False) -> None:
        self.threads.shutdown(wait=not abort, cancel_futures=True)


@flow(name="hyperparameter-sweep", result_serializer="json")
def hyperparameter_sweep(params_path: str = "params.yaml", trials: Optional[int] = None,
                         parallel: Optional[int] = None, overrides: Optional[dict[str, Any]] = None,
                         base_overrides: Optional[dict[str, Any]] = None, mirrors: Optional[list[str]] = None) -> dict:
    """`trials`: finished trials the study ends with (a rerun after a crash adds the rest); `base_overrides`
    are a deployment's fixed settings, `overrides` go on top."""
    overrides = {**(base_overrides or {}), **(overrides or {})}
    cfg = load_config(params_path, overrides)
    stage_tasks.download(cfg, mirrors)
    stage_tasks.prepare_cached(cfg)
    parallel = parallel or cfg.sweep.parallel
    launcher = PoolLauncher(cfg, parallel) if cfg.runtime.orchestration.train_pool else None
    record = stage_tasks.sweep(cfg, read_params(params_path), overrides, trials, parallel, launcher, flow_run_tags())
    registry = record.get("registry") or {}
    verdict = (f"\n\nBest trial registered as `{registry['model']}` v{registry['version']}, "
               f"{'**promoted to production**' if registry['promoted'] else '**not promoted**'}: {registry['reason']} "
               f"(test accuracy {registry['test_accuracy']:.4f})") if registry else ""
    create_markdown_artifact(
        f"# Sweep `{record['study']}`\n\nBest trial {record['best_trial']}: {record['metric']} "
        f"{record['best_value']:.4f} (baseline {record['baseline_value']}). Parent run: {record['parent_run']}"
        f"{verdict}\n\n{record['top_trials']}", key="sweep-report", description="Top trials, with their MLflow runs")
    get_run_logger().info("sweep %s: best trial %s, %s %.4f", record["study"], record["best_trial"], record["metric"],
                          record["best_value"])
    return {k: v for k, v in record.items() if k not in ("trials", "top_trials")}
