"""Prefect flows on a real Prefect API: in-process (test harness) and through deployments and a worker."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from .conftest import MNIST_NAMES, REPO, TINY_OVERRIDES, MirrorServer, free_port, wait_http, write_params

FAST = {**TINY_OVERRIDES, "tracking.enabled": True, "train.max_epochs": 1, "train.batch_size": 256,
        "register.min_accuracy": 0.0, "data.download_retries": 1, "data.download_backoff_s": 0.0}


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_pipeline_flow_retries_download_and_caches_prepare(prefect_api, workdir, shared_mnist, mlflow_server,
                                                           monkeypatch):
    from flows.pipeline import training_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_params(workdir / "params.yaml", {**FAST, "register.model_name": "flow-inproc",
                                           "tracking.experiment": "flow-inproc"})
    server = MirrorServer(shared_mnist)
    server.faults["train-labels-idx1-ubyte.gz"] = [503]  # the first try fails; the task's retry succeeds
    try:
        result = training_pipeline("params.yaml", {}, [server.url])
    finally:
        server.close()
    assert server.requests.count("train-labels-idx1-ubyte.gz") == 2
    assert result["registry"]["version"] == "1" and result["test"]["accuracy"] > 0.9
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.data.tags["prefect.flow_run_id"] and len(client.get_metric_history(run.info.run_id, "val_loss")) == 1

    meta = workdir / "data/processed/meta.json"
    stamp = meta.stat().st_mtime_ns
    again = training_pipeline("params.yaml", {"train.lr": 0.02}, [str(shared_mnist)])
    assert meta.stat().st_mtime_ns == stamp  # prepare was a cache hit: its outputs were not rewritten
    assert again["run_id"] != result["run_id"]
    (workdir / "data/processed/val.pt").unlink()  # a cache hit must not stand for outputs that are gone
    training_pipeline("params.yaml", {}, [str(shared_mnist)])
    assert (workdir / "data/processed/val.pt").is_file() and meta.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_deployment_run_dispatches_train_to_gpu_pool(tmp_path, shared_mnist, mlflow_server):
    """A real Prefect server, pools, two process workers, deployments, `prefect deployment run` from the CLI."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    work = tmp_path / "work"
    params = write_params(tmp_path / "params.yaml", {
        **FAST, "data.mirrors": [str(shared_mnist)], "data.dvc_file": None,
        "data.raw_dir": str(work / "data/raw"), "data.processed_dir": str(work / "data/processed"),
        "train.out_dir": str(work / "models"), "train.metrics_dir": str(work / "metrics"),
        "evaluate.out_dir": str(work / "reports"), "register.model_name": "flow-deployed",
        "tracking.experiment": "flow-deployed"})
    procs = []

    def start(*args, log):
        procs.append(subprocess.Popen([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO,
                                      stdout=open(tmp_path / log, "wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def prefect(*args, timeout=300):
        out = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out.stdout

    try:
        server = start("server", "start", "--host", "127.0.0.1", "--port", str(port), log="server.log")
        wait_http(f"{api}/health", server, timeout=120)
        prefect("work-pool", "create", "default", "--type", "process")
        prefect("work-pool", "create", "gpu", "--type", "process")
        out = subprocess.run([sys.executable, "-m", "flows.deploy", "--params", str(params)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "training-pipeline/mnist-cnn" in out.stdout and "train/gpu" in out.stdout
        start("worker", "start", "--pool", "default", log="worker-default.log")
        start("worker", "start", "--pool", "gpu", log="worker-gpu.log")
        t0 = time.perf_counter()
        run_out = prefect("deployment", "run", "training-pipeline/mnist-cnn", "--param",
                          'overrides={"train.max_epochs": 1}', "--watch", "--watch-timeout", "400", timeout=480)
        deployment_wall = time.perf_counter() - t0
        assert "Completed" in run_out
        query = ("import json\nfrom prefect.client.orchestration import get_client\n"
                 "with get_client(sync_client=True) as c:\n"
                 "    runs = c.read_flow_runs()\n"
                 "    flows = {f.id: f.name for f in c.read_flows()}\n"
                 "    print(json.dumps([{'flow': flows[r.flow_id], 'pool': r.work_pool_name, 'state': r.state.type.value,"
                 " 'parent': bool(r.parent_task_run_id), 'seconds': r.total_run_time.total_seconds()} for r in runs]))\n")
        runs = json.loads(subprocess.run([sys.executable, "-c", query], env=env, capture_output=True, text=True,
                                         timeout=120).stdout)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    seconds = {r["flow"]: r.pop("seconds") for r in runs}
    assert {"flow": "train", "pool": "gpu", "state": "COMPLETED", "parent": True} in runs, runs
    assert {"flow": "training-pipeline", "pool": "default", "state": "COMPLETED", "parent": False} in runs, runs
    client = mlflow.MlflowClient(mlflow_server)
    prod = client.get_model_version_by_alias("flow-deployed", "production")
    run = client.get_run(prod.run_id)
    assert run.data.tags.get("imgclf.train") == "remote"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 1 and "test_accuracy" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "outputs/train")} >= {"outputs/train/best.pt"}
    assert json.loads((work / "metrics/train.json").read_text())["epochs_run"] == 1
    print(f"\ndeployment run wall {deployment_wall:.1f}s; pipeline flow run {seconds['training-pipeline']:.1f}s, "
          f"child train flow run {seconds['train']:.1f}s, of which fitting {run.data.metrics['train_seconds']:.1f}s")


def test_compare_models_flow_registers_the_best(prefect_api, workdir, shared_mnist, mlflow_server, monkeypatch):
    from flows.compare import compare_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    write_params(workdir / "params.yaml", {**FAST, "data.mirrors": [str(shared_mnist)],
                                           "register.model_name": "flow-compare", "tracking.experiment": "flow-compare"})
    result = compare_models("params.yaml", {}, [{"model.kind": "mlp"}, {"model.kind": "cnn"}])
    assert len(result["accuracy"]) == 2 and result["best"] == max((0, 1), key=lambda i: result["accuracy"][i])
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("flow-compare")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "compare-models"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(r.data.tags["model.kind"] for r in children) == ["cnn", "mlp"]
    assert result["registry"]["version"] == "1" and result["registry"]["promoted"]


def test_run_command_rejects_bad_params_before_prefect(workdir):
    from .conftest import cli

    res = cli("run", "--set", "train.batch_size=0")
    assert res.exit_code == 2 and "train.batch_size" in res.stderr
