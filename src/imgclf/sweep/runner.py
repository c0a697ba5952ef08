"""The sweep loop: ask the study for trials, keep `parallel` of them in flight on a launcher, tell it how each
ended, and keep every record straight when a sweep is killed and run again.

The launcher runs trials where they train: local processes (local.py) or the train pool's workers (the
Prefect flow gives one). It has `submit(spec) -> Future`, `overrides()` and `close(abort)`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, Optional

import optuna
from optuna.trial import TrialState

from ..config import Config
from . import study as studies
from .space import baseline, best_trial, suggest
from .trial import trial_spec

log = logging.getLogger("imgclf")
MAX_FAILURES_IN_A_ROW = 3


class _Heartbeat:
    """Records a heartbeat for every trial this process has in flight, every HEARTBEAT_S seconds."""

    def __init__(self, storage):
        self.storage, self.ids, self.stop = storage, set(), threading.Event()
        self.thread = threading.Thread(target=self._beat, name="sweep-heartbeat", daemon=True)

    def add(self, trial_id: int) -> None:
        self.storage.record_heartbeat(trial_id)  # at once: a trial never beaten would never go stale
        self.ids.add(trial_id)

    def _beat(self) -> None:
        while not self.stop.wait(studies.HEARTBEAT_S):
            for trial_id in list(self.ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as exc:  # noqa: BLE001 - a busy database: the next beat tries again
                    log.debug("heartbeat of trial id %s: %s", trial_id, exc)

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def _trial_dirs(cfg: Config, name: str, number: int) -> dict[str, str]:
    own = f"sweep/{name}/trial-{number:04d}"
    return {"paths.models_dir": f"{cfg.paths.models_dir}/{own}", "paths.metrics_dir": f"{cfg.paths.metrics_dir}/{own}",
            "paths.reports_dir": f"{cfg.paths.reports_dir}/{own}"}


class Sweep:
    """One invocation of a sweep over a study (which may already hold trials from earlier ones)."""

    def __init__(self, cfg: Config, raw: dict, overrides: dict[str, Any], launcher, data: dict[str, str], *,
                 trials: int, parallel: int,
                 tags: Optional[dict[str, str]] = None, on_trial: Callable[[str], None] = log.info):
        from ..tracking.store import connect

        self.cfg, self.raw, self.overrides, self.launcher = cfg, raw, overrides, launcher
        self.trials, self.parallel, self.tags, self.on_trial = trials, parallel, dict(tags or {}), on_trial
        self.dims = cfg.sweep.dimensions
        self.max_epochs = cfg.sweep.max_epochs or cfg.train.max_epochs
        self.url, self.name = studies.storage_url(cfg), studies.study_name(cfg)
        if hasattr(launcher, "warm"):
            launcher.warm(cfg.tracking, self.url)
        self.study = studies.open_study(cfg, self.url, self.name, self.max_epochs, data)
        self.client, self.experiment_id = connect(cfg.tracking)
        self.in_flight: dict[concurrent.futures.Future, tuple[optuna.Trial, str, float]] = {}
        self.failures_in_a_row, self.last_error = 0, ""
        self.worker_start_s: list[float] = []

    # -- MLflow -------------------------------------------------------------------------------------------
    def close_lost_runs(self, trials) -> None:
        """The child runs of trials whose process was lost: KILLED, not RUNNING forever."""
        for t in trials:
            run_id = t.user_attrs.get("mlflow_run_id")
            if t.state == TrialState.FAIL and "error" not in t.user_attrs and run_id:
                try:
                    run = self.client.get_run(run_id)
                    if run.data.tags.get("sweep.state") in ("lost", "interrupted"):
                        continue
                    # Its training may have ended well just before the sweep died, but the study never heard.
                    self.client.set_tag(run_id, "sweep.state", "lost")
                    if run.info.status == "RUNNING":
                        self.client.set_terminated(run_id, "KILLED")
                    log.info("trial %d: its sweep was lost; MLflow run %s marked lost%s", t.number, run_id,
                             " and KILLED" if run.info.status == "RUNNING" else "")
                except Exception as exc:  # noqa: BLE001 - a run deleted by hand: nothing left to close
                    log.debug("trial %d: run %s: %s", t.number, run_id, exc)

    def trial_overrides(self, number: int, values: dict[str, Any]) -> dict[str, Any]:
        """What a trial runs with: the sweep's own overrides, the trial's point of the space, its own folders.
        Always made here from the trial's number and params, never read back from the study: a trial's
        overrides recorded there could name any path."""
        return {**self.overrides, **values, **_trial_dirs(self.cfg, self.name, number),
                **({"train.max_epochs": self.cfg.sweep.max_epochs} if self.cfg.sweep.max_epochs else {}),
                **self.launcher.overrides()}

    # -- the loop -----------------------------------------------------------------------------------------
    def done(self) -> int:
        return sum(studies.counts(t) for t in self.study.get_trials(deepcopy=False))

    def others_running(self) -> int:
        mine = {t.number for t, _, _ in self.in_flight.values()}
        return sum(t.number not in mine for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def launch(self, parent_run_id: str, heartbeat: _Heartbeat) -> None:
        trial = self.study.ask()
        heartbeat.add(trial._trial_id)
        values = suggest(trial, self.dims)
        overrides = self.trial_overrides(trial.number, values)
        tags = {**self.tags, "sweep.study": self.name, "sweep.trial": str(trial.number),
                "sweep.parent_run_id": parent_run_id}
        run = self.client.create_run(self.experiment_id, run_name=f"{self.name}-trial-{trial.number}",
                                     tags={**tags, "mlflow.parentRunId": parent_run_id, "sweep.state": "running"})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("overrides", overrides)
        retried = studies.retry_of(self.study, trial._trial_id)
        log.info("trial %d started%s: %s", trial.number, f" (retry of trial {retried})" if retried is not None else "",
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))
        spec = trial_spec(study=self.name, storage=self.url, trial_id=trial._trial_id, number=trial.number,
                          params=self.raw, overrides=overrides, run_id=run.info.run_id, parent_run_id=parent_run_id,
                          tags=tags, max_epochs=self.max_epochs)
        self.in_flight[self.launcher.submit(spec)] = (trial, run.info.run_id, time.perf_counter())

    def settle(self, future: concurrent.futures.Future, heartbeat: _Heartbeat) -> None:
        trial, run_id, started = self.in_flight.pop(future)
        wall = time.perf_counter() - started
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - the trial's own failure (a diverging lr, ...): recorded, go on
            # A diverging lr is an answer about the space; three other failures in a row mean a broken setup.
            self.failures_in_a_row += type(exc).__name__ != "NonFiniteLoss"
            self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            trial.set_user_attr("error", self.last_error[:500])
            self.study.tell(trial, state=TrialState.FAIL)
            self._end_child(run_id, "failed", "FAILED")
            self.on_trial(f"trial {trial.number} failed: {self.last_error}")
        else:
            self.failures_in_a_row = 0
            for k in ("fit_s", "epochs", "kept_epoch"):
                trial.set_user_attr(k, result[k])
            trial.set_user_attr("wall_s", round(wall, 3))
            trial.set_user_attr("overhead_s", round(wall - result["fit_s"], 3))
            if result["state"] == "pruned":
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                self.study.tell(trial, result["value"])
            self._end_child(run_id, result["state"], None)
            self.on_trial(self._line(trial.number, result, wall))
        heartbeat.ids.discard(trial._trial_id)

    def _end_child(self, run_id: str, state: str, status: Optional[str]) -> None:
        self.client.set_tag(run_id, "sweep.state", state)
        if status and self.client.get_run(run_id).info.status == "RUNNING":  # failed before train opened it
            self.client.set_terminated(run_id, status)

    def _line(self, number: int, result: dict, wall: float) -> str:
        best = best_trial(self.study, self.dims, warn=False)  # _finish names any left out, once
        return (f"trial {number} {result['state']}: {self.cfg.sweep.metric} {result['value']:.4f} after "
                f"{result['epochs']} epoch(s), {wall:.1f}s ({wall - result['fit_s']:.1f}s overhead) | "
                f"{self.done()}/{self.trials} done" + (f", best {best.value:.4f} (trial {best.number})" if best else ""))

    def run(self, parent_run_id: str) -> None:
        if not self.study.trials and self.cfg.sweep.baseline and self.dims:
            self.study.enqueue_trial(baseline(self.cfg, self.dims), user_attrs={"baseline": True})
        self.close_lost_runs(self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        # Each worker's start (imports) ends before the first trial's clock starts: overhead is per trial.
        self.worker_start_s = [round(s, 2) for s in getattr(self.launcher, "start_seconds", list)()]
        with _Heartbeat(self.study._storage) as heartbeat:
            try:
                self._loop(parent_run_id, heartbeat)
            except BaseException:  # Ctrl-C, SIGTERM, a lost database: give the trials in flight back
                for trial, run_id, _ in self.in_flight.values():
                    studies.abandon(self.study, trial._trial_id)
                    self._end_child(run_id, "interrupted", "KILLED")
                self.launcher.close(abort=True)
                raise
            self.launcher.close()

    def _loop(self, parent_run_id: str, heartbeat: _Heartbeat) -> None:
        while True:
            self.close_lost_runs(studies.fail_stale(self.study))
            done, others = self.done(), self.others_running()
            giving_up = self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW
            while not giving_up and len(self.in_flight) < self.parallel and \
                    done + len(self.in_flight) + others < self.trials:
                self.launch(parent_run_id, heartbeat)
            if not self.in_flight:
                if giving_up:
                    raise RuntimeError(f"sweep {self.name}: {MAX_FAILURES_IN_A_ROW} trials failed in a row; the last: "
                                       f"{self.last_error}")
                if others and done < self.trials:  # another sweep's, or a killed one's, until their heartbeat stops
                    time.sleep(studies.HEARTBEAT_S)
                    continue
                return
            finished, _ = concurrent.futures.wait(list(self.in_flight), timeout=studies.HEARTBEAT_S,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                self.settle(future, heartbeat)
