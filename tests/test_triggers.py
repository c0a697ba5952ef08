"""Events, deployment triggers and notifications on a real Prefect server with a process worker: new raw data
retrains, a drifted batch retrains and ends `Drifted`, and promotion, drift and a failed run each reach a
webhook receiver on loopback, and so does a move of production by hand (`imgclf promote`)."""

from __future__ import annotations

import getpass
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime

import numpy as np
import pytest

import mlflow

from .helpers import REPO, TINY_OVERRIDES, Processes, free_port, separable_digits, stop_groups, wait_http, write_params
from .prefect_chain import snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receiver:
    """A webhook receiver: keeps every JSON body POSTed to it."""

    def __init__(self):
        self.bodies: list[dict] = []
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"


def _image_folder(root, n: int, seed: int) -> np.ndarray:
    """An ImageFolder of separable digits (class = the band's height), PNG files; returns the images."""
    from PIL import Image

    images, labels = separable_digits(n, seed, n_classes=4)
    for i, (img, c) in enumerate(zip(images, labels)):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{c}" / f"{seed}-{i:04d}.png")
    return images


def _when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_new_data_and_drift_trigger_training_and_notifications_arrive(tmp_path, mlflow_server):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "2"}  # a run waits 1 s for the worker, not 5
    work = tmp_path / "work"
    images = _image_folder(tmp_path / "incoming", 240, seed=0)  # the team's data folder: new files land here
    params = write_params(tmp_path / "params.yaml", {
        **TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 2, "register.min_score": 0.0,
        "data.source": "imagefolder", "data.path": str(tmp_path / "incoming"), "paths.dvc_file": None,
        **{f"paths.{k}": str(work / v) for k, v in (("raw_dir", "data/raw"), ("processed_dir", "data/processed"),
                                                    ("models_dir", "models"), ("metrics_dir", "metrics"),
                                                    ("reports_dir", "reports"))},
        "monitor.out_dir": str(work / "inference"), "monitor.inbox": str(tmp_path / "inbox"),
        "monitor.drift.min_images": 50,
        "register.model_name": "triggered", "runtime.tracking.experiment": "triggered"})
    receiver = Receiver()
    procs = Processes(env, tmp_path)
    start, run = procs.start, procs.run

    def chain():
        events, runs, artifacts = snapshot(api)
        chain.artifacts = artifacts
        return events, runs

    def wait_runs(predicate, what, timeout=420):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events, runs = chain()
            if predicate(runs):
                return events, runs
            time.sleep(3)
        raise TimeoutError(f"{what}: {json.dumps(runs, default=str)[-3000:]}\n"
                           + (tmp_path / "worker.log").read_text()[-3000:])

    try:
        server = start("prefect-server", "--port", str(port), log="server.log", module="imgclf.cli")
        wait_http(f"{api}/health", server, timeout=240)
        run("work-pool", "create", "default", "--type", "process")
        out = run("--params", str(params), "--train-pool", "", "--retrain-on-new-data", "--retrain-on-drift",
                  module="flows.deploy")
        assert "batch-inference/production" in out and "data-refresh/download" in out
        out = run("--webhook", receiver.url, module="flows.notify")
        assert out.count("automation imgclf:") == 3
        assert "3 automations deleted" in run("--delete", module="flows.notify")  # and back: --delete, then again
        run("--webhook", receiver.url, module="flows.notify")
        assert "3 automations paused" in run("--off", module="flows.notify")
        assert "3 automations resumed" in run("--on", module="flows.notify")
        start("worker", "start", "--pool", "default", log="worker.log")

        # New raw data (a first snapshot of the folder) -> imgclf.data.changed -> the trigger starts
        # training-pipeline/mnist-cnn.
        run("deployment", "run", "data-refresh/download", "--watch", "--watch-timeout", "300", timeout=360)
        events, runs = wait_runs(lambda rs: any(r["flow"] == "training-pipeline" and r["type"] == "COMPLETED"
                                                for r in rs), "a triggered training run")
        changed = [e for e in events if e["event"] == "imgclf.data.changed"]
        assert len(changed) == 1 and changed[0]["resource"]["imgclf.flow"] == "data-refresh"
        trained = [r for r in runs if r["flow"] == "training-pipeline"]
        assert len(trained) == 1 and trained[0]["parameters"]["triggered_by"] == f"imgclf.data.changed {changed[0]['id']}"
        occurred = _when(changed[0]["occurred"])
        latency = {"event_to_flow_run_created": _when(trained[0]["created"]) - occurred,
                   "event_to_start": _when(trained[0]["start"]) - occurred,
                   "event_to_trained_and_registered": _when(trained[0]["end"]) - occurred}
        print("\nevent -> retrain latency (s): " + ", ".join(f"{k} {v:.1f}" for k, v in latency.items()))
        client = mlflow.MlflowClient(mlflow_server)
        version = client.get_model_version_by_alias("triggered", "production")
        assert client.get_run(version.run_id).data.tags["trigger"].startswith("imgclf.data.changed ")
        # The triggered pipeline snapshotted the same folder: no second event. Nor does a refresh with
        # nothing new.
        run("deployment", "run", "data-refresh/download", "--watch", "--watch-timeout", "300", timeout=360)
        events, runs = chain()
        assert sum(e["event"] == "imgclf.data.changed" for e in events) == 1
        assert sum(r["flow"] == "training-pipeline" for r in runs) == 1

        # A drifted batch in the inbox: inverted images. The run ends Drifted, the files leave the inbox for
        # scored/<batch>/, and the drift event retrains.
        from PIL import Image

        (tmp_path / "inbox").mkdir()
        for i, img in enumerate(255 - images[:120]):
            Image.fromarray(img).save(tmp_path / "inbox" / f"upload-{i:03d}.png")
        from imgclf.locks import file_lock

        with file_lock(tmp_path / "inbox" / ".imgclf-inbox.lock"):  # another run is scoring the inbox
            out = run("deployment", "run", "batch-inference/production", "--param", "settle_s=0", "--watch",
                      "--watch-timeout", "300", timeout=360)
        assert "Busy" in out and len(list((tmp_path / "inbox").glob("*.png"))) == 120, out[-2000:]
        out = run("deployment", "run", "batch-inference/production", "--param", "settle_s=0", "--watch",
                  "--watch-timeout", "300", timeout=360)
        assert "Drifted" in out, out[-2000:]
        (batch,) = (tmp_path / "inbox" / "scored").iterdir()
        assert sorted(p.name for p in (tmp_path / "inbox").iterdir() if p.name[0] != ".") == ["scored"]
        assert len(list(batch.iterdir())) == 120
        report = json.loads((work / "inference" / batch.name / "drift.json").read_text())
        assert {"width", "height", "aspect"} <= set(report["detectors"]["image_stats"]["tests"])  # an ImageFolder's files
        assert report["detectors"]["image_stats"]["tests"]["brightness"]["drifted"]
        chain()
        (shown,) = [a["data"] for a in chain.artifacts if a["key"] == "drift-report"]
        assert "Verdict: **drift**" in shown and "| image statistics | brightness |" in shown
        events, runs = wait_runs(lambda rs: sum(r["flow"] == "training-pipeline" for r in rs) == 2,
                                 "the drift-triggered training run")
        # The server's automations act on the event stream; its event store writes in batches, a few seconds
        # later: the run the event triggered can be listed before the event is.
        deadline = time.monotonic() + 60
        while not any(e["event"] == "imgclf.drift.detected" for e in events) and time.monotonic() < deadline:
            time.sleep(2)
            events, runs = chain()
        drift = [e for e in events if e["event"] == "imgclf.drift.detected"]
        assert len(drift) == 1 and "image_stats" in drift[0]["payload"]["flagged"]
        assert any(r["parameters"].get("triggered_by") == f"imgclf.drift.detected {drift[0]['id']}" for r in runs)

        # A move by hand notifies too: `imgclf promote` tells the server at PREFECT_API_URL (CSRF on).
        wait_runs(lambda rs: sum(r["flow"] == "training-pipeline" and r["type"] == "COMPLETED" for r in rs) == 2,
                  "the drift-triggered training run's end")
        held = client.get_model_version_by_alias("triggered", "production").version
        other = "1" if str(held) == "2" else "2"
        promoted = subprocess.run([sys.executable, "-m", "imgclf.cli", "promote", "--version", other, "--reason",
                                   "by hand in the test", "--params", str(params)], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
        assert promoted.returncode == 0, promoted.stderr[-3000:]
        assert json.loads(promoted.stdout)["notification"].startswith(f"imgclf.model.promoted sent to {api}")

        # A failing run (a bad param) notifies too.
        out = run("deployment", "run", "training-pipeline/mnist-mlp", "--param", 'overrides={"train.lr": -1}',
                  "--watch", "--watch-timeout", "300", timeout=360, ok=False)
        assert "Failed" in out, out[-2000:]
    finally:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Failed" in b.get("subject", "") for b in receiver.bodies):
            time.sleep(2)
        stop_groups(procs.started)
        receiver.server.shutdown()
    subjects = [b["subject"] for b in receiver.bodies]
    print("notifications: " + json.dumps(subjects))
    assert any(s.startswith("imgclf: triggered v") and s.endswith("is production") for s in subjects)
    assert any(s.startswith("imgclf: drift in batch imgclf.batch.") for s in subjects)
    # the drift report as the receiver can open it: the batch's MLflow run, not a folder on the worker
    assert any(f"(report: batch/drift.html of MLflow run {mlflow_server}/#/experiments/" in b["body"]
               for b in receiver.bodies if b["subject"].startswith("imgclf: drift")), receiver.bodies
    (manual,) = [b for b in receiver.bodies if b["subject"] == f"imgclf: triggered v{other} is production"]
    assert f"promote by {getpass.getuser()}, v{held} before: by hand in the test" in manual["body"], manual
    assert any(s.startswith("imgclf: training-pipeline run") and "Failed" in s for s in subjects)
    assert all("body" in b and b["body"] for b in receiver.bodies)


def test_a_webhooks_credentials_live_in_the_blocks_secret_field():
    """The URL a user gives may carry a login and a token; the saved block's readable fields hold neither, and
    the request Prefect builds from it is the URL the user gave."""
    from flows.notify import webhook_block

    block = webhook_block("https://bob:s3cret@hooks.example.com/hook/x?token=t0ken&channel=ml")
    readable = block.model_dump_json()  # what any API client or the UI reads back: secrets masked
    assert "s3cret" not in readable and "t0ken" not in readable and block.url == "https://hooks.example.com/hook/x?{{query}}"
    request = block._build_request_args("body", "subject")
    assert request["url"] == "https://hooks.example.com/hook/x?token=t0ken&channel=ml"
    assert request["headers"] == {"Authorization": "Basic Ym9iOnMzY3JldA=="}
    for bad in ("file:///etc/passwd", "ftp://host/x", "javascript:alert(1)"):
        with pytest.raises(SystemExit, match="an http\\(s\\) URL is needed"):
            webhook_block(bad)
