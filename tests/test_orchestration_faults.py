"""Faults of a deployed pipeline, fed for real on a Prefect server with process workers: the GPU worker killed
mid-epoch (the training resumes on another worker, in the same MLflow run, to the same weights), and the
MLflow and Prefect servers restarted while a deployed pipeline trains."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

import mlflow
from imgclf.training.checkpoint import load_checkpoint

from .helpers import TINY_OVERRIDES, MlflowServer, Processes, free_port, stop_groups, wait_http, write_params
from .prefect_chain import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEARTBEAT_S = 30  # Prefect's least; the default is 180
WORKER_LOST = {
    **TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 3, "train.patience": 100,
    "train.batch_size": 256, "register.min_score": 0.0, "runtime.download.retries": 1,
    "runtime.orchestration.train_lost_after_s": 2 * HEARTBEAT_S,
    "register.model_name": "worker-lost", "runtime.tracking.experiment": "worker-lost", "paths.dvc_file": None}


class Deployed:
    """A Prefect server (restartable: same port, same database), the deployments of flows.deploy, and process
    workers; `runs()` reads every flow run, `wait(predicate)` polls with the workers' logs on a timeout."""

    def __init__(self, tmp_path, mlflow_uri: str, params, train_pool: str):
        self.tmp, self.port = tmp_path, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": self.api,
                    "MLFLOW_TRACKING_URI": mlflow_uri, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "2",
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}
        self.procs = Processes(self.env, tmp_path)
        self.start_server()
        for pool in ("default", *([train_pool] if train_pool else [])):
            self.procs.run("work-pool", "create", pool, "--type", "process")
        self.procs.run("--params", str(params), "--train-pool", train_pool, module="flows.deploy")

    def start_server(self) -> None:
        self.server = self.procs.start("prefect-server", "--port", str(self.port), log="server.log", module="imgclf.cli")
        wait_http(f"{self.api}/health", self.server, timeout=240)

    def stop_server(self) -> None:
        stop_groups([self.server])
        self.procs.started.remove(self.server)

    def worker(self, pool: str, log: str):
        return self.procs.start("worker", "start", "--pool", pool, log=log)

    def runs(self) -> list[dict]:
        return snapshot(self.api, events=False, artifacts=False)[1]

    def wait(self, predicate, what: str, timeout: float = 420.0, every: float = 2.0):
        """Poll every `every` seconds: a file check may poll fast, one that asks a server every 2 s (at 4 Hz the
        queries cost the Prefect server and this process more CPU than the training they wait for)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(every)
        logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:] for p in self.tmp.glob("*.log"))
        raise TimeoutError(f"{what}: {json.dumps(self.runs(), default=str)[-2500:]}\n{logs}")

    def ended(self, flow: str) -> list[dict]:
        return [r for r in self.runs() if r["flow"] == flow and r["type"] in ("COMPLETED", "FAILED", "CRASHED")]

    def close(self) -> None:
        stop_groups(self.procs.started)


def _params(tmp_path, shared_mnist, **overrides):
    work = tmp_path / "work"
    return work, write_params(tmp_path / "params.yaml", {
        **WORKER_LOST, "runtime.download.mirrors": [str(shared_mnist)], **overrides,
        **{f"paths.{k}": str(work / k.removesuffix("_dir")) for k in ("raw_dir", "processed_dir", "models_dir",
                                                                       "metrics_dir", "reports_dir")}})


def _only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id]) if exp else []
    assert len(found) <= 1, [r.info for r in found]
    return found[0] if found else None


def _kill_tree(proc) -> None:
    """SIGKILL a worker and every process under it, at once, as a machine that dies (its flow run's process
    has a session of its own, so the worker's process group alone would leave it training)."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def test_servers_restarted_then_a_gpu_worker_killed_under_deployed_pipelines(tmp_path, shared_mnist):
    """One Prefect server, one MLflow server, the deployments of flows.deploy and real MNIST, two pipeline runs:

    1. training in the pipeline's worker; MLflow restarted in epoch 2, Prefect in epoch 3, MLflow again while
       evaluate uploads the model: the run goes on to the end (or fails in one line and a rerun completes); one
       MLflow run, epochs 1-3, one version, no flow run left running. Its weights are the uninterrupted ones.
    2. training on the gpu pool; the worker SIGKILLed in epoch 2 with its flow run's process, as a machine that
       dies: the pipeline sees the heartbeats stop, marks that train run Crashed and submits it again; another
       worker resumes the same MLflow run after epoch 1, to the same weights as run 1."""
    (tmp_path / "store").mkdir()
    tracking = MlflowServer(tmp_path / "store").start()
    work, params = _params(tmp_path, shared_mnist)
    client = mlflow.MlflowClient(tracking.url)
    deployed = Deployed(tmp_path, tracking.url, params, train_pool="gpu")
    log = tmp_path / "pipeline-worker.log"
    checkpoint = work / "models/checkpoint.pt"

    def restart(server) -> None:
        server.stop()
        time.sleep(3)
        server.start()

    def epoch_done(n):
        try:
            return checkpoint.is_file() and load_checkpoint(checkpoint)["epoch"] >= n
        except ValueError:  # read while it is renamed into place
            return False

    def run_pipeline(**overrides) -> None:
        deployed.procs.run("deployment", "run", "training-pipeline/mnist-cnn", "--param",
                           f"overrides={json.dumps(overrides)}")

    try:
        deployed.worker("default", "pipeline-worker.log")
        run_pipeline(**{"runtime.orchestration.train_pool": None, "register.model_name": "restarts",
                        "runtime.tracking.experiment": "restarts"})
        deployed.wait(lambda: epoch_done(1), "epoch 1", every=0.25)
        restart(tracking)
        deployed.wait(lambda: epoch_done(2), "epoch 2", every=0.25)
        deployed.stop_server()
        time.sleep(3)
        deployed.start_server()
        deployed.wait(lambda: "logging the reports and the model" in log.read_text(errors="replace"), "evaluate's logging",
                      every=0.25)
        restart(tracking)
        first = deployed.wait(lambda: deployed.ended("training-pipeline"), "the pipeline to end")[0]
        print(f"\nthe pipeline under three restarts: {first['type']} {first['message']}")
        if first["type"] != "COMPLETED":
            assert "\n" not in first["message"].strip(), first["message"]
            run_pipeline(**{"runtime.orchestration.train_pool": None, "register.model_name": "restarts",
                            "runtime.tracking.experiment": "restarts"})
            ended = deployed.wait(lambda: (e := deployed.ended("training-pipeline")) and len(e) == 2 and e, "the rerun")
            assert {r["type"] for r in ended} >= {"COMPLETED"}, ended
        assert all(r["type"] not in ("RUNNING", "PENDING", "SCHEDULED") for r in deployed.runs())
        runs = client.search_runs([client.get_experiment_by_name("restarts").experiment_id])
        assert all(r.info.status in ("FINISHED", "FAILED") for r in runs), [r.info for r in runs]
        (version,) = client.search_model_versions("name='restarts'")
        assert [m.step for m in client.get_metric_history(version.run_id, "epoch/val_loss")] == [1, 2, 3]
        assert client.get_model_version_by_alias("restarts", "production").version == version.version
        uninterrupted = (work / "models/best.pt").read_bytes()
        pipelines = len(deployed.ended("training-pipeline"))

        # 2. The same training on the gpu pool, its worker killed in epoch 2.
        first_gpu = deployed.worker("gpu", "gpu-worker-1.log")
        run_pipeline()
        run = deployed.wait(lambda: (r := _only_run(client, "worker-lost")) and
                            r.data.tags.get("train.checkpoint_epoch") == "1" and r, "epoch 1's checkpoint uploaded",
                            every=0.5)
        _kill_tree(first_gpu)
        run = client.get_run(run.info.run_id)
        assert run.data.tags["train.checkpoint_epoch"] == "1" and run.info.status == "RUNNING"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_loss")] == [1]
        deployed.worker("gpu", "gpu-worker-2.log")  # another machine joins the pool

        done = deployed.wait(lambda: (e := deployed.ended("training-pipeline")) and len(e) > pipelines and e,
                             "the gpu pipeline to end")
        latest = max(done, key=lambda r: r["created"])
        assert latest["type"] == "COMPLETED", latest
        runs = deployed.runs()
        trains = sorted((r for r in runs if r["flow"] == "train"), key=lambda r: r["created"])
        assert [r["type"] for r in trains] == ["CRASHED", "COMPLETED"], trains
        assert "no heartbeat for" in trains[0]["message"], trains[0]
        assert all(r["type"] not in ("RUNNING", "PENDING", "SCHEDULED") for r in runs)
        report = [a["data"] for a in snapshot(deployed.api)[2] if a["key"] == "training-report"]
        assert any("Training took 2 train flow runs, in one MLflow run (resumed after epoch 1)" in r for r in report)

        # One MLflow run, its epochs 1-3 each logged once, the resume recorded, registered from it.
        run = _only_run(client, "worker-lost")
        assert run.info.status == "FINISHED", run.info
        assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val_loss")] == [1, 2, 3]
        assert run.data.tags["train.resumed_after_epochs"] == "1" and run.data.tags["train.attempts"] == "2"
        assert client.get_model_version_by_alias("worker-lost", "production").run_id == run.info.run_id
        # The same weights as the training never interrupted (run 1: same params, data, seed and thread count).
        assert (work / "models/best.pt").read_bytes() == uninterrupted
    finally:
        deployed.close()
        tracking.stop()
