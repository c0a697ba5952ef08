"""The `training-pipeline` flow: download → prepare → train → evaluate → register, and the `train` flow
that a worker in a GPU pool runs when `runtime.orchestration.train_pool` is set."""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

CODE = Path(__file__).resolve().parents[1]  # the checkout, or the commit a worker fetched from git
if importlib.util.find_spec("imgclf") is None:  # a worker whose environment has the dependencies only
    sys.path.insert(0, str(CODE / "src"))

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from imgclf import config  # noqa: E402
from imgclf.config.params_file import read_params  # noqa: E402
from imgclf.tracking import remote  # noqa: E402
from tasks import stages as stage_tasks  # noqa: E402


def load_config(params_path: str, overrides: Optional[dict[str, Any]]) -> config.Config:
    """The same validation as the CLI; `overrides` uses the dotted keys of `--set`."""
    return config.load(params_path, dict(overrides or {}))


def flow_run_url() -> Optional[str]:
    """This flow run's page in the Prefect UI; None on the local API (no UI)."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui else None


def flow_run_tags() -> dict[str, str]:
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_name": str(flow_run.flow_name)}
    url = flow_run_url()
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


def _links(cfg: config.Config, registered: dict) -> tuple[str, str]:
    """The MLflow run page and the model version page (or how to open them over the embedded store)."""
    from imgclf.tracking.store import page, run_route, tracking_uri, version_route

    uri = tracking_uri(cfg.tracking)
    return (page(uri, run_route(registered["experiment_id"], registered["run_id"])),
            page(uri, version_route(registered["model"], registered["version"])))


def _report(cfg: config.Config, evaluation: dict, registered: dict, train: dict) -> str:
    from imgclf.tracking.store import tracking_uri, ui_base

    run_link, version_link = _links(cfg, registered)
    if ui_base(tracking_uri(cfg.tracking)):
        run_link, version_link = f"[{run_link}]({run_link})", f"[{version_link}]({version_link})"
    rows = "\n".join(f"| {k} | {evaluation[k]:.4f} |" for k in ("accuracy", "macro_f1", "loss", "ece",
                                                              "ece_before_scaling", "temperature") if k in evaluation)
    verdict = "**promoted to production**" if registered["promoted"] else "**not promoted**"
    checks = "\n".join(f"| {c['name']} | {c['value']} | {c['limit']} | {'pass' if c['passed'] else '**FAIL**'} |"
                       for c in registered.get("checks", []))
    robust = "\n".join(f"| {k[len('robust_'):-len('_acc')]} | {v:.2%} |" for k, v in evaluation.items()
                       if k.startswith("robust_"))
    return (f"# {cfg.model.kind} on {cfg.data.source}\n\n| test metric | value |\n|---|---|\n{rows}\n\n"
            f"| behavioural test | accuracy |\n|---|---|\n{robust}\n\n"
            f"| gate check | value | requirement | result |\n|---|---|---|---|\n{checks}\n\n"
            f"Model card: `{evaluation['reports']}/model_card.md` (and the run's artifact `reports/model_card.md`); "
            "pictures: `robustness.png`, `reliability.png`.\n\n" + _flips(registered) +
            f"Weights of epoch {train.get('kept_epoch')} of {train.get('epochs_run')} kept "
            f"({train.get('kept_because', '')}; val accuracy {train.get('kept_val_acc', 0):.4f}).\n\n"
            + _attempts(train) +
            f"Registry: `{registered['model']}` v{registered['version']} {verdict}: {registered['reason']}\n\n"
            f"- MLflow run `{registered['run_id']}`: {run_link}\n"
            f"- Model version {registered['model']} v{registered['version']}: {version_link}\n")


def _flips(registered: dict) -> str:
    """The image-by-image comparison with production, when there was one, and where its pictures are."""
    paired, reuse = registered.get("paired"), registered.get("test_reuse")
    lines = f"Test split: {reuse['text']}.\n\n" if reuse else ""
    if paired:
        low, high = paired["macro_f1_ci"]
        lines += (f"Against production v{registered['previous_production']}: {paired['fixed']} test images fixed, "
                  f"{paired['broken']} broken of {paired['n']} (McNemar p {paired['p_value']:.4g}); macro F1 "
                  f"{paired['macro_f1_diff']:+.4f} (95% CI {low:+.4f} to {high:+.4f}). The flips: "
                  + ", ".join(f"`{f}`" for f in registered.get("flips", []))
                  + f" (and the run's artifacts `gate/v{registered['version']}/`).\n\n")
    return lines


def _attempts(train: dict) -> str:
    """What it took a train pool to finish the training, when it took more than one train flow run."""
    attempts = train.get("attempts") or []
    if len(attempts) < 2:
        return ""
    resumed = ", ".join(map(str, train.get("resumed_after_epochs") or []))
    how = f"resumed after epoch {resumed}" if resumed else "started over: no epoch had been uploaded"
    return (f"Training took {len(attempts)} train flow runs, in one MLflow run ({how}):\n\n"
            + "".join(f"{i}. {line}\n" for i, line in enumerate(attempts, 1)) + "\n")


def _final_line(cfg: config.Config, evaluation: dict, registered: dict) -> str:
    """What a person watching wants at the end: accuracy, the decision, and where to look."""
    run_link, version_link = _links(cfg, registered)
    was = registered.get("previous_production")
    decision = (f"v{registered['version']} promoted to production" + (f" (was v{was})" if was else " (the first)")
                if registered["promoted"] else
                f"v{registered['version']} registered, not promoted (production stays "
                + (f"v{was})" if was else "empty)"))
    return (f"test accuracy {evaluation['accuracy']:.2%}, macro F1 {evaluation['macro_f1']:.4f}; {registered['model']} "
            f"{decision}. MLflow run: {run_link} | model version: {version_link}")


def _train_remote(cfg: config.Config, params_path: str, overrides: Optional[dict], tags: dict) -> dict:
    """Train on the pool, in one MLflow run however many attempts it takes: a train flow run that crashed or
    whose worker went silent is submitted again (runtime.orchestration.train_retries), and the new attempt,
    on whichever worker takes it, resumes from the last epoch checkpoint the run's artifacts hold."""
    import time

    logger = get_run_logger()
    orchestration = cfg.runtime.orchestration
    start = time.perf_counter()
    run_id = remote.ship_inputs(cfg, tags)
    name = f"train/{orchestration.train_pool}"
    logger.info("training dispatched to deployment %s (MLflow run %s)", name, run_id)
    # The params themselves, not a path: a worker shares no disk with the pipeline.
    parameters = {"params": read_params(params_path), "overrides": overrides or {}, "run_id": run_id}
    attempts = []  # one line per train flow run that did not complete
    while True:
        child = follow_train_run(run_deployment(name, parameters=parameters, timeout=0).id, logger,
                                 orchestration.train_timeout_s, lost_after=orchestration.train_lost_after_s)
        if child.state and child.state.is_completed():
            break
        ended = f"train flow run {child.name} ({child.id}) ended {child.state.name if child.state else 'without a state'}"
        attempts.append(ended)
        # A Crashed run (its process or its worker gone) may well succeed elsewhere; a Failed one raised in
        # the training itself (bad data, a diverged loss) and would fail again.
        if not (child.state and child.state.is_crashed()) or len(attempts) > orchestration.train_retries:
            why = f"{ended} in pool {orchestration.train_pool}" + (
                f", after {len(attempts)} attempts" if len(attempts) > 1 else "")
            remote.end_abandoned(cfg, run_id, why)
            raise RuntimeError(why)
        logger.warning("%s; submitting it again (retry %d of %d): it resumes in MLflow run %s from the last "
                       "checkpoint uploaded", ended, len(attempts), orchestration.train_retries, run_id)
    remote.fetch_outputs(cfg, run_id)
    remote.tag_run(cfg, run_id, {"train.attempts": str(len(attempts) + 1)})
    return {"run_id": run_id, "flow_run_id": str(child.id), **load_train_summary(cfg),
            "attempts": [*attempts, f"train flow run {child.name} ({child.id}) completed"],
            "seconds": round(time.perf_counter() - start, 3)}


def follow_train_run(flow_run_id, logger, timeout: Optional[float], every: float = 5.0,
                     lost_after: Optional[float] = None, relay: bool = True):
    """Wait for the child train run, repeating its log lines here as they come (so `prefect deployment run
    --watch` on the pipeline shows each epoch, and the wait for a free worker; `relay=False`: its state
    changes only, as a sweep's many trials would drown the log); returns the finished run.
    A running child whose heartbeats stop for `lost_after` seconds lost its worker (a killed machine leaves
    it Running forever): it is marked Crashed, which frees its slot in the pool, and returned."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    seen, state, t0, said = 0, None, time.monotonic(), time.monotonic()
    beat = (None, 0.0)  # the last heartbeat event seen, and when (this machine's clock: the worker's may differ)

    def relay_logs(client, run) -> int:
        nonlocal seen
        if not relay:
            return 0
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), offset=seen,
                                sort=LogSort.TIMESTAMP_ASC)
        for entry in logs:
            logger.info("train run %s: %s", run.name, entry.message)
        seen += len(logs)
        return len(logs)

    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            relay_logs(client, run)
            if run.state and run.state.is_final() and relay:
                # The worker's process sends its last log lines in batches, after the run is marked final: a
                # training shorter than one poll showed no epoch at all. Relay until three reads in a row bring nothing.
                quiet, deadline = 0, time.monotonic() + 15
                while quiet < 3 and time.monotonic() < deadline:
                    time.sleep(1.0)
                    quiet = 0 if relay_logs(client, run) else quiet + 1
            if run.state and run.state.name != state:
                state = run.state.name
                logger.info("train run %s: %s%s", run.name, state, " (waiting for a worker of the pool)"
                            if run.state.is_scheduled() or run.state.is_pending() else "")
                said = time.monotonic()
            elif relay and time.monotonic() - said >= 10:
                logger.info("train run %s: still %s (%.0f s)", run.name, state, time.monotonic() - t0)
                said = time.monotonic()
            if run.state and run.state.is_final():
                return run
            if lost_after and run.state and run.state.is_running():
                latest = _last_heartbeat(client, flow_run_id)
                limit = silence_limit(lost_after, run.labels.get(HEARTBEAT_LABEL))
                if latest != beat[0]:
                    beat = (latest, time.monotonic())
                elif latest is not None and time.monotonic() - beat[1] > limit:
                    from prefect.states import Crashed

                    message = (f"no heartbeat for {time.monotonic() - beat[1]:.0f} s (limit {limit:g} s: "
                               f"runtime.orchestration.train_lost_after_s={lost_after:g}, beats every "
                               f"{run.labels.get(HEARTBEAT_LABEL, '180 (assumed)')} s): its worker is gone")
                    client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                    logger.warning("train run %s: %s; marked Crashed", run.name, message)
                    return client.read_flow_run(flow_run_id)
            if timeout and time.monotonic() - t0 > timeout:
                raise TimeoutError(f"train flow run {run.name} ({flow_run_id}) not finished after {timeout:.0f} s")
            time.sleep(every)


HEARTBEAT_LABEL = "imgclf.heartbeat_s"  # a train flow run's label: its engine's heartbeat interval


def silence_limit(lost_after: float, interval: Optional[str]) -> float:
    """How long a running train flow run may be silent before it counts as lost: train_lost_after_s, and never
    less than two of its heartbeat intervals and 15 s (a late beat is not a dead worker). A run without the
    label (a worker on older code) is taken to beat at Prefect's default, every 180 s."""
    try:
        every = float(interval) if interval else 180.0
    except ValueError:  # "off": no heartbeats, never judged (no beat is ever seen)
        every = 180.0
    return max(lost_after, 2 * every + 15)


def _label_heartbeat() -> None:
    """Tell the pipeline how often this run beats: the worker's setting, which the pipeline cannot see."""
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    every = get_current_settings().flows.heartbeat_frequency
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(flow_run.id, {HEARTBEAT_LABEL: str(max(every, 30)) if every else "off"})
    except Exception as exc:  # noqa: BLE001 - without it the pipeline assumes Prefect's default: slower to judge
        get_run_logger().warning("heartbeat interval not labelled on the flow run (%s)", str(exc).splitlines()[0])


def _last_heartbeat(client, flow_run_id) -> Optional[str]:
    """The id of the flow run's latest `prefect.flow-run.heartbeat` event (its engine sends one every
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds), None before the first."""
    from datetime import UTC, datetime, timedelta

    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder, EventResourceFilter

    now = datetime.now(UTC)
    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=now - timedelta(days=7), until=now + timedelta(days=1)),
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"]), order=EventOrder.DESC), limit=1)
    return str(page.events[0].id) if page.events else None


def load_train_summary(cfg: config.Config) -> dict:
    from imgclf.files import read_json_file
    from imgclf.layout import Layout

    return read_json_file(Layout.of(cfg).train_summary)


@flow(name="training-pipeline", result_serializer="json")
def training_pipeline(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                      mirrors: Optional[list[str]] = None, base_overrides: Optional[dict[str, Any]] = None,
                      triggered_by: Optional[str] = None) -> dict:
    """`base_overrides` are a deployment's fixed settings (model kind, train pool); `overrides`
    (e.g. `--param overrides='{"train.max_epochs": 3}'`) go on top. `triggered_by`: the event a deployment
    trigger ran this for (its name and id; flows/deploy.py fills it in), kept as the MLflow tag `trigger`."""
    overrides = {**(base_overrides or {}), **(overrides or {})}
    cfg = load_config(params_path, overrides)
    logger = get_run_logger()
    tags = {**flow_run_tags(), **({"trigger": triggered_by} if triggered_by else {})}
    if triggered_by:
        logger.info("run by the trigger on %s", triggered_by)
    downloaded = stage_tasks.download(cfg, mirrors)
    prepared = stage_tasks.prepare_cached(cfg)
    if cfg.runtime.orchestration.train_pool:
        trained = _train_remote(cfg, params_path, overrides, tags)
    else:
        trained = stage_tasks.train(cfg, tags)  # the loop's own deadline enforces train_timeout_s
    evaluation = stage_tasks.evaluate(cfg, tags)
    registered = stage_tasks.register(cfg, tags)
    logger.info(_final_line(cfg, evaluation, registered))
    create_markdown_artifact(_report(cfg, evaluation, registered, trained), key="training-report",
                             description="Test metrics, promotion decision and MLflow run")
    stage_seconds = {"download": downloaded["seconds"], "prepare": prepared["seconds"], "train": trained["seconds"],
                     "evaluate": evaluation["seconds"], "register": registered["seconds"]}
    return {"run_id": registered["run_id"], "test": {k: evaluation[k] for k in ("accuracy", "macro_f1", "loss")},
            "registry": registered, "stage_seconds": stage_seconds}


@flow(name="train", result_serializer="json")
def train_flow(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
               run_id: Optional[str] = None, params: Optional[dict[str, Any]] = None,
               trial: Optional[dict[str, Any]] = None) -> dict:
    """Train on a worker: inputs from the MLflow run's artifacts, outputs back to them. `params` (the
    pipeline's params file, as sent by it) wins over `params_path` (a file of the worker's code). `trial`: a
    sweep's trial (imgclf.sweep.trial), its inputs on the sweep's parent run, its pruner asked every epoch."""
    # Parsed once: the worker's own folders are paths, set on the resolved config without parsing again.
    cfg = config.from_dict(params, overrides) if params is not None else load_config(params_path, overrides)
    if not run_id:
        return stage_tasks.train(cfg, flow_run_tags())
    _label_heartbeat()
    with tempfile.TemporaryDirectory(prefix="imgclf-train-") as tmp:
        processed = remote.fetch_inputs(cfg, trial["parent_run_id"] if trial else run_id, Path(tmp))
        worker = {"processed_dir": str(processed), "models_dir": f"{tmp}/models", "metrics_dir": f"{tmp}/metrics"}
        local = dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, **worker))
        # Folders are paths, not params: the run's params are the same as on the pipeline's machine.
        from imgclf.tracking.lineage import git_state

        tags = {**flow_run_tags(), "worker.host": socket.gethostname(), "worker.code": str(CODE),
                "worker.commit": git_state(CODE)["git.commit"], **{f"worker.paths.{k}": v for k, v in worker.items()}}
        if trial:
            paths = {f"paths.{k}": v for k, v in worker.items()}
            summary = stage_tasks.sweep_trial({**trial, "overrides": {**trial["overrides"], **paths},
                                               "tags": {**trial["tags"], **tags}})
        else:
            # A run an earlier attempt trained in (its worker lost) holds that attempt's last checkpoint.
            from imgclf.layout import Layout

            after = remote.fetch_checkpoint(local, run_id, Layout.of(local).checkpoint)
            if after is not None:
                get_run_logger().info("resuming MLflow run %s after epoch %d, from its checkpoint artifact", run_id,
                                      after)
            summary = stage_tasks.train(local, tags, run_id, resume=after is not None, checkpoint_to_run=True)
        remote.ship_outputs(local, run_id)
    return summary
