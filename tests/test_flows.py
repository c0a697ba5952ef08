"""Prefect flows on a real Prefect API: in-process (test harness) and through deployments and a worker."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

import mlflow
from imgclf import config

from .helpers import (
    TINY_OVERRIDES,
    MirrorServer,
    MlflowServer,
    cli,
    imgclf,
    runs_of,
    wait_for,
    write_params,
)

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers

# Real MNIST, downloaded and decoded whole, then 5,000 images per split: the wiring is the point here (the
# default model's numbers are tests/test_trust.py's and bench/'s), and the full splits cost each flow 30 s of CPU.
FAST = {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 1, "train.batch_size": 256,
        "register.min_score": 0.0, "runtime.download.retries": 1, "runtime.download.backoff_s": 0.0,
        "data.max_per_split": 5000}


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A temporary Prefect server for this module, with a result store of its own (not ~/.prefect/storage, where
    another session's records would be cache hits); yields its API URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), \
            temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        yield PREFECT_API_URL.value()


def test_deploy_refuses_uncommitted_code_before_creating_anything(prefect_api, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deploy import deploy

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.01\n")
    git("add", ".")
    git("-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "init")
    # params.yaml as `dvc exp run -S` leaves it: the pipeline sends its params to the worker, so no refusal
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.002\n")
    from flows.deploy import head_commit

    assert len(head_commit(tmp_path)) == 40
    (tmp_path / "code.py").write_text("a = 2\n")

    async def names():
        async with get_client() as client:
            return {d.name for d in await client.read_deployments()}

    before = asyncio.run(names())
    with pytest.raises(SystemExit, match="code.py: uncommitted changes"):
        deploy(train_source="https://git.example.com/team/imgclf.git", repo=tmp_path)
    assert asyncio.run(names()) == before


def test_deploy_says_one_line_per_deployment_and_names_a_missing_pool(prefect_api, capfd):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.deploy import deploy

    with pytest.raises(SystemExit, match="work pool 'nowhere' not found; create it first"):
        deploy(pipeline_pool="nowhere", train_pool="")
    with get_client(sync_client=True) as client:
        for pool in ("default", "gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    capfd.readouterr()
    created = deploy()
    assert deploy() == created  # a second deploy updates the same seven
    printed = capfd.readouterr()
    assert created[0] == "training-pipeline/mnist-cnn on pool default" and created[-1] == "train/gpu on pool gpu"
    assert len(created) == 7 and "Deployments" not in printed.out + printed.err
    assert "process work pool" not in printed.out + printed.err
    with get_client(sync_client=True) as client:
        names = {(d.name, d.work_pool_name) for d in client.read_deployments()}
    assert {("mnist-cnn", "default"), ("mnist-mlp", "default"), ("production", "default"), ("download", "default"),
            ("mnist", "default"), ("gpu", "gpu")} <= names


def test_pipeline_flow_retries_download_and_caches_prepare(prefect_api, workdir, shared_mnist, mlflow_server,
                                                           monkeypatch):
    from flows.pipeline import training_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_params(workdir / "params.yaml", {**FAST, "register.model_name": "flow-inproc",
                                           "runtime.tracking.experiment": "flow-inproc"})
    server = MirrorServer(shared_mnist)
    server.faults["train-labels-idx1-ubyte.gz"] = [503]  # the first try fails; the task's retry succeeds
    try:
        result = training_pipeline("params.yaml", {}, [server.url])
    finally:
        server.close()
    assert server.requests.count("train-labels-idx1-ubyte.gz") == 2
    assert result["registry"]["version"] == "1" and result["test"]["accuracy"] > 0.75  # 20 steps: it learns
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.data.tags["prefect.flow_run_id"] and len(client.get_metric_history(run.info.run_id, "epoch/val_loss")) == 1

    # The cache's cases below run the pipeline's own first two tasks (download, prepare_cached) in a flow of
    # their own: the same tasks, cache key and result store, without training four more models.
    from prefect import flow

    from flows.pipeline import load_config
    from tasks import stages

    @flow(name="training-pipeline-data")
    def data_stages(overrides: dict) -> dict:
        cfg = load_config("params.yaml", overrides)
        stages.download(cfg, [str(shared_mnist)])
        return stages.prepare_cached(cfg)

    meta = workdir / "data/processed/meta.json"
    stamp = meta.stat().st_mtime_ns
    data_stages({"train.lr": 0.02})  # a training param is not an input of prepare
    assert meta.stat().st_mtime_ns == stamp  # prepare was a cache hit: its outputs were not rewritten
    data_stages({"data.val_fraction": 0.25})  # a data param is
    assert meta.stat().st_mtime_ns != stamp
    # Back to 0.2: the first run's record is in the cache, but the folder holds 0.25's splits (intact): not a hit.
    stamp = meta.stat().st_mtime_ns
    data_stages({})
    assert meta.stat().st_mtime_ns != stamp and json.loads(meta.read_text())["params"]["val_fraction"] == 0.2
    stamp = meta.stat().st_mtime_ns
    (workdir / "data/processed/val.pt").unlink()  # a cache hit must not stand for outputs that are gone
    data_stages({})
    assert (workdir / "data/processed/val.pt").is_file() and meta.stat().st_mtime_ns != stamp

    # Prefect's result store holds prepare's record as JSON; one that names pickle (written by anyone who can
    # write the folder) is replaced, never loaded.
    import pickle

    from prefect.settings import get_current_settings

    from tasks.stages import prepare_cache_key

    cfg = config.load("params.yaml")
    record = Path(get_current_settings().results.local_storage_path).expanduser() / prepare_cache_key(None, {"cfg": cfg})
    stored = json.loads(record.read_text())
    assert stored["metadata"]["serializer"]["type"] == "json" and json.loads(stored["result"])["sizes"]
    marker = workdir / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import base64

    stored["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle"}
    stored["result"] = base64.b64encode(pickle.dumps(Payload())).decode()
    record.write_text(json.dumps(stored))
    stamp = meta.stat().st_mtime_ns
    data_stages({})
    assert not marker.exists() and meta.stat().st_mtime_ns != stamp  # prepare ran again
    assert json.loads(record.read_text())["metadata"]["serializer"]["type"] == "json"

    # Valid JSON under the JSON serializer is not enough: Prefect's decoder imports whatever module an object tag
    # names (`this` prints the Zen of Python on import). Such a record is replaced before Prefect reads it.
    import sys

    assert "this" not in sys.modules
    stored = json.loads(record.read_text())
    stored["result"] = json.dumps({"sizes": {"__class__": "this.s", "data": "x"}})
    record.write_text(json.dumps(stored))
    stamp = meta.stat().st_mtime_ns
    data_stages({})
    assert "this" not in sys.modules and meta.stat().st_mtime_ns != stamp
    assert "__class__" not in json.loads(record.read_text())["result"]


def test_compare_models_flow_registers_the_best(prefect_api, workdir, shared_mnist, mlflow_server, monkeypatch):
    from flows.compare import compare_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_params(workdir / "params.yaml", {**FAST, "runtime.download.mirrors": [str(shared_mnist)],
                                           "register.model_name": "flow-compare", "runtime.tracking.experiment": "flow-compare"})
    result = compare_models("params.yaml", {}, [{"model.kind": "mlp"}, {"model.kind": "cnn"}])
    assert len(result["accuracy"]) == 2 and result["best"] == max((0, 1), key=lambda i: result["accuracy"][i])
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("flow-compare")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "compare-models"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.data.tags["model.kind"] for r in children) == ["cnn", "mlp"]
    assert result["registry"]["version"] == "1" and result["registry"]["promoted"]


def test_a_heartbeat_line_reaches_the_flow_runs_log(prefect_api):
    """The heartbeat's thread logs inside the task's run: its lines are in the flow run's log on the API (before
    the fix Prefect dropped them as runless: "attempted to send logs to the API without a flow run id")."""
    import logging

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.runtime import flow_run as current

    from imgclf.progress import heartbeat
    from tasks.stages import library_logs

    @task
    @library_logs
    def silent_step():
        with heartbeat(logging.getLogger("imgclf.stages.evaluate").info, "evaluate: scoring the test split", 0.1):
            time.sleep(0.45)

    @flow(name="heartbeat-check")
    def check() -> str:
        silent_step()
        return current.id

    run_id = check()

    def said() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        return [log.message for log in logs if "still working" in log.message]

    deadline = time.monotonic() + 30
    while not (lines := said()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert lines and lines[0].startswith("evaluate: scoring the test split (still working,")


def test_run_command_rejects_bad_params_before_prefect(workdir):
    from click.testing import CliRunner

    from flows.__main__ import run

    res = CliRunner().invoke(run, ["--set", "train.batch_size=0"])
    assert res.exit_code == 2 and "train.batch_size" in res.stderr


def _flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def test_train_timeout_fails_the_flow_run_and_the_mlflow_run(prefect_api, workdir, shared_mnist, mlflow_server,
                                                             monkeypatch):
    from flows.pipeline import training_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_params(workdir / "params.yaml", {**FAST, "runtime.download.mirrors": [str(shared_mnist)],
                                           "train.max_epochs": 1000, "runtime.orchestration.train_timeout_s": 3,
                                           "runtime.tracking.experiment": "flow-timeout"})
    start = time.monotonic()
    state = training_pipeline("params.yaml", return_state=True)
    assert time.monotonic() - start < 90  # stopped, not left running in a worker thread
    assert state.is_failed() and "timeout" in state.message, state.message
    (run,) = runs_of(mlflow_server, "flow-timeout")
    assert run.info.status == "FAILED"
    assert _flow_run(run.data.tags["prefect.flow_run_id"]).state.is_failed()


def test_sigterm_crashes_the_flow_run_and_kills_the_mlflow_run(prefect_api, workdir, shared_mnist, mlflow_server):
    write_params(workdir / "params.yaml", {**FAST, "runtime.download.mirrors": [str(shared_mnist)], "train.max_epochs": 1000,
                                           "runtime.tracking.experiment": "flow-sigterm"})
    proc = imgclf(cwd=workdir, module="flows", env={"PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": mlflow_server})
    wait_for(lambda: runs_of(mlflow_server, "flow-sigterm"), proc, timeout=180, what="the MLflow run of the train stage",
             every=0.5)
    time.sleep(2)  # into the first epoch
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    (run,) = runs_of(mlflow_server, "flow-sigterm")
    assert run.info.status == "KILLED", err[-3000:]
    state = _flow_run(run.data.tags["prefect.flow_run_id"]).state
    assert state.type.value == "CRASHED", state


def test_register_retries_until_the_mlflow_server_is_back(prefect_api, tiny_workdir, tmp_path, monkeypatch):
    """The server goes down after evaluate; the register task's retries succeed once it is back."""
    import threading

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    from imgclf.config import load
    from tasks.stages import register

    (tmp_path / "store").mkdir()
    server = MlflowServer(tmp_path / "store").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "register.min_score": 0.0, "register.model_name": "comeback"})
    assert cli("train").exit_code == 0 and cli("evaluate").exit_code == 0
    outputs = {p: p.stat().st_mtime_ns for p in (tiny_workdir / "models").iterdir()}
    server.stop()
    restarter = threading.Thread(target=lambda: (time.sleep(2), server.start()))

    @flow
    def register_only() -> dict:
        return register(load("params.yaml"))

    try:
        restarter.start()
        state = register_only(return_state=True)
    finally:
        restarter.join()
        server.stop()
    assert state.is_completed(), state.message
    assert state.result()["version"] == "1" and state.result()["promoted"]
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    assert [r.run_count for r in runs if r.name.startswith("register")][0] >= 2
    assert all(p.stat().st_mtime_ns == t for p, t in outputs.items())  # trained outputs untouched


def test_sweep_flow_prunes_records_every_trial_and_registers_the_best(prefect_api, workdir, shared_mnist,
                                                                       mlflow_server, monkeypatch):
    """6 trials, 2 at once, on a small subset: a parent run and 6 child runs, the pruned ones FINISHED and
    tagged, the best one registered with the sweep in its lineage, a markdown report on the flow run."""
    import optuna
    from prefect.client.orchestration import get_client

    from flows.sweep import hyperparameter_sweep

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    storage = f"sqlite:///{workdir}/optuna.db"
    write_params(workdir / "params.yaml", {
        **FAST, "runtime.download.mirrors": [str(shared_mnist)], "register.model_name": "flow-sweep",
        "runtime.tracking.experiment": "flow-sweep", "runtime.tracking.study_storage": storage,
        "sweep.max_epochs": 3, "sweep.train_subset": 1000, "sweep.startup_trials": 1, "sweep.warmup_epochs": 0,
        # Half the choices cannot learn: once a trial that can has finished, the pruner stops them at epoch 1.
        "sweep.space": {"train.lr": {"choice": [0.01, 1e-7]}, "model.cnn.dropout": {"uniform": [0.0, 0.5]}}})
    result = hyperparameter_sweep("params.yaml", trials=6, parallel=2)
    study = optuna.load_study(study_name="flow-sweep-cnn", storage=storage)
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and "RUNNING" not in states and states.count("PRUNED") >= 1, states
    assert study.trials[0].params["train.lr"] == 0.01 and study.trials[0].user_attrs["baseline"]
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("flow-sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    by_trial = {int(r.data.tags["sweep.trial"]): r for r in children}
    for t in study.trials:
        run = by_trial[t.number]
        assert run.data.tags["sweep.state"] == t.state.name.lower().replace("complete", "complete")
        epochs = len(client.get_metric_history(run.info.run_id, "epoch/val_acc"))
        assert epochs < 3 if t.state.name == "PRUNED" else epochs == 3, (t.number, t.state, epochs)
        assert run.data.params["train.lr"] == str(t.params["train.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent, "sweep")}
    assert {"sweep/trials.csv", "sweep/optimization_history.png", "sweep/intermediate_values.png"} <= artifacts
    assert parents[0].data.tags["sweep.best_trial"] == str(study.best_trial.number)
    registered = result["registry"]
    version = client.get_model_version("flow-sweep", registered["version"])
    assert version.run_id == result["best_run_id"] == by_trial[study.best_trial.number].info.run_id
    assert version.tags["sweep.parent_run_id"] == parent and registered["promoted"]
    with get_client(sync_client=True) as prefect:
        reports = [a for a in prefect.read_artifacts() if a.key == "sweep-report"]
    assert reports and result["best_run_id"] in reports[-1].data
