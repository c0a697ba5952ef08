"""Create the deployments (the server at PREFECT_API_URL, work pools already made):

- training-pipeline/mnist-cnn and training-pipeline/mnist-mlp on the pipeline pool (default `default`),
  training dispatched to the train pool (default `gpu`; --train-pool '' trains in the pipeline's process);
  their code is this checkout, where the pipeline worker runs;
- hyperparameter-sweep/mnist-cnn on the pipeline pool: an Optuna sweep (`--param trials=N`), each trial a
  child flow run of train/<train pool>;
- train/<train pool> on the train pool: the flow a worker on a GPU machine runs. With --train-source its
  code is that git repository at the commit deployed (default: this checkout's HEAD, which must be
  pushed there), fetched by the worker itself, so GPU hosts need no copy of the checkout;
- batch-inference/production and data-refresh/download on the pipeline pool (flows/monitor.py);
- data-audit/mnist on the pipeline pool: suspected label errors and near-duplicates (flows/audit.py).

Turned on by one flag each (run deploy again without it to turn it off; `prefect automation ls` lists them):
  --retrain-on-new-data   training-pipeline/mnist-cnn runs when a data-refresh run emits imgclf.data.changed
  --retrain-on-drift      training-pipeline/mnist-cnn runs when a batch-inference run emits imgclf.drift.detected
  --inbox-every MINUTES   batch-inference/production scores the inbox (monitor.inbox) every MINUTES
  --refresh-every MINUTES data-refresh/download runs every MINUTES

    uv run python -m flows.deploy [--pipeline-pool default] [--train-pool gpu] [--params params.yaml]
                                  [--train-source GIT_URL [--commit SHA]] [--retrain-on-new-data]
                                  [--retrain-on-drift] [--inbox-every MINUTES] [--refresh-every MINUTES]
"""

from __future__ import annotations

import argparse
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Optional

from prefect import flow
from prefect.runner.storage import GitRepository

REPO = Path(__file__).resolve().parents[1]


def head_commit(repo: Path = REPO) -> str:
    """HEAD of the checkout; refused when tracked code differs from it (the worker would run other code). Not
    params.yaml: the pipeline sends the train worker its params with each run (the worker never reads its own),
    so an experiment's edit there (`dvc exp run -S`) runs the same everywhere."""
    from imgclf.tracking.lineage import changed_files

    changed = [p for p in changed_files(repo) or [] if p.endswith(".py") or p in ("pyproject.toml", "uv.lock")]
    if changed:
        raise SystemExit(f"error: {', '.join(changed)}: uncommitted changes; commit and push them, or pass --commit")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def retrain_triggers(on_new_data: bool, on_drift: bool) -> list:
    """Deployment triggers for the training pipeline; the event's name and id reach the run as `triggered_by`."""
    from prefect.events import DeploymentEventTrigger

    from tasks import events

    params = {"triggered_by": "{{ event.event }} {{ event.id }}"}
    triggers = []
    if on_new_data:  # a training-pipeline run's own download already trains on what it fetched
        triggers.append(DeploymentEventTrigger(name="retrain on new data", expect={events.DATA_CHANGED},
                                               match={"imgclf.flow": "data-refresh"}, parameters=params))
    if on_drift:
        triggers.append(DeploymentEventTrigger(name="retrain on drift", expect={events.DRIFT_DETECTED},
                                               parameters=params))
    return triggers


def deploy(pipeline_pool: str = "default", train_pool: str = "gpu", params: str = "params.yaml",
           train_source: Optional[str] = None, commit: Optional[str] = None, repo: Path = REPO,
           retrain_on_new_data: bool = False, retrain_on_drift: bool = False, inbox_every: Optional[float] = None,
           refresh_every: Optional[float] = None) -> list[str]:
    """Create or update every deployment; returns `flow/deployment on pool` for each. Applied one by one rather
    than through Prefect's `deploy()`, which prints a table and a process-pool hint (to use `.serve` instead) on
    each call: six tables and the same hint six times for one command."""
    # Decided before anything is created: a refusal leaves no deployment behind.
    pinned = (commit or head_commit(repo)) if train_pool and train_source else None
    pools = [pipeline_pool, *([train_pool] if train_pool else [])]
    _check_pools(pools)
    train_here = {"runtime.orchestration.train_pool": train_pool} if train_pool else {}
    planned = []  # (entrypoint, code source, work pool, deployment options)
    for kind in ("cnn", "mlp"):
        planned.append(("flows/pipeline.py:training_pipeline", str(REPO), pipeline_pool, dict(
            name=f"mnist-{kind}", parameters={"params_path": params, "base_overrides": {"model.kind": kind, **train_here}},
            triggers=retrain_triggers(retrain_on_new_data, retrain_on_drift) if kind == "cnn" else [],
            description=f"download → prepare → train ({kind}) → evaluate → register")))
    planned.append(("flows/sweep.py:hyperparameter_sweep", str(REPO), pipeline_pool, dict(
        name="mnist-cnn", parameters={"params_path": params, "base_overrides": {"model.kind": "cnn", **train_here}},
        description="an Optuna sweep over sweep.space; trials " + (f"on pool {train_pool}" if train_pool else "here"))))
    planned.append(("flows/audit.py:data_audit", str(REPO), pipeline_pool, dict(
        name="mnist", parameters={"params_path": params},
        description="suspected label errors and near-duplicate images of the prepared splits (imgclf audit)")))
    planned.append(("flows/monitor.py:batch_inference", str(REPO), pipeline_pool, dict(
        name="production", parameters={"params_path": params},
        interval=timedelta(minutes=inbox_every) if inbox_every else None,
        description="score a folder or IDX file (default: the inbox) with the production model; drift check")))
    planned.append(("flows/monitor.py:data_refresh", str(REPO), pipeline_pool, dict(
        name="download", parameters={"params_path": params},
        interval=timedelta(minutes=refresh_every) if refresh_every else None,
        description="download only; emits imgclf.data.changed when the raw data changed")))
    if train_pool:
        source = GitRepository(url=train_source, commit_sha=pinned) if train_source else str(REPO)
        planned.append(("flows/pipeline.py:train_flow", source, train_pool, dict(
            name=train_pool, parameters={"params_path": params},
            description="the train stage, run by a worker in this pool")))
    created = []
    for entrypoint, source, pool, options in planned:
        deployment = flow.from_source(source=source, entrypoint=entrypoint).to_deployment(**options)
        deployment.apply(work_pool_name=pool)
        created.append(f"{deployment.flow_name}/{deployment.name} on pool {pool}")
    return created


def _check_pools(pools: list[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                raise SystemExit(f"error: work pool {pool!r} not found; create it first: "
                                 f"prefect work-pool create {pool} --type process") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline-pool", default="default")
    p.add_argument("--train-pool", default="gpu")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--train-source", default=None, help="git URL the train worker fetches its code from")
    p.add_argument("--commit", default=None, help="commit of --train-source to pin (default: HEAD here)")
    p.add_argument("--retrain-on-new-data", action="store_true", help="train when data-refresh sees new raw data")
    p.add_argument("--retrain-on-drift", action="store_true", help="train when a batch-inference run finds drift")
    p.add_argument("--inbox-every", type=float, default=None, metavar="MINUTES",
                   help="schedule batch-inference over the inbox (monitor.inbox)")
    p.add_argument("--refresh-every", type=float, default=None, metavar="MINUTES", help="schedule data-refresh")
    args = p.parse_args()
    for dep in deploy(args.pipeline_pool, args.train_pool, args.params, args.train_source, args.commit,
                      retrain_on_new_data=args.retrain_on_new_data, retrain_on_drift=args.retrain_on_drift,
                      inbox_every=args.inbox_every, refresh_every=args.refresh_every):
        print(f"deployed {dep}")


if __name__ == "__main__":
    main()
