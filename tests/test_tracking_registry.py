"""Tracking, registry, promotion and predict against a real MLflow server on loopback."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mlflow
from imgclf import config

from .helpers import cli, free_port, separable_digits, wait_http

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def _stage(*args, env=None):
    res = cli(*args, env=env)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if res.stdout.strip().startswith("{") else res.stdout


def _client(url):
    return mlflow.MlflowClient(url, url)


def test_run_registry_gate_promote_rollback_predict(tracked_workdir, mlflow_server, tmp_path):
    cfg = config.load("params.yaml")
    name = cfg.model_name
    client = _client(mlflow_server)

    # 1. A full run: per-epoch metrics, params, lineage, pictures, TorchScript, model; first model -> production.
    train = _stage("train")
    evaluation = _stage("evaluate")
    reg = _stage("register")
    run_id = train["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "epoch/val_acc")) == cfg.train.max_epochs
    assert run.data.params["train.lr"] == str(cfg.train.lr) and "model.cnn.channels" in run.data.params
    # The params are the resolved settings that ran: the same as the config's, none of them "None".
    from imgclf.tracking.lineage import flat_params

    assert run.data.params == flat_params(cfg) and "None" not in run.data.params.values()
    assert not any(k.startswith(("runtime.", "paths.")) for k in run.data.params)
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert {"git.commit", "data.dvc_md5", "params.digest", "data.sha256.train.pt"} <= set(run.data.tags)
    artifacts = {a.path for a in client.list_artifacts(run_id, "reports")}
    for pic in ("confusion_matrix.png", "learning_curves.png", "misclassified.png", "conv_filters.png",
                "feature_maps.png", "seed_kernels.png", "per_class.csv"):
        assert f"reports/{pic}" in artifacts
    assert [a.path for a in client.list_artifacts(run_id, "torchscript")] == ["torchscript/model.pt"]
    assert reg["promoted"] and reg["version"] == "1" and "first model" in reg["reason"]
    assert reg["production"] == "1" and reg["previous_production"] is None  # the summary says what happened
    assert client.get_model_version_by_alias(name, "production").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "1"
    assert client.get_model_version(name, "1").tags["test.accuracy"] == str(evaluation["accuracy"])

    # Registering the same run again makes no second version.
    again = _stage("register")
    assert again["version"] == "1" and not again["created"]

    # 2. A worse challenger is not promoted; the reason is on both versions.
    worse = ["--set", "train.max_epochs=1", "--set", "train.lr=1e-6", "--set", "register.min_score=0"]
    _stage("train", *worse)
    _stage("evaluate", *worse)
    reg2 = _stage("register", *worse)
    assert reg2["version"] == "2" and not reg2["promoted"] and "not better than production v1" in reg2["reason"]
    # One scorer: the gate re-scored production with evaluate's function on the same split, so the number
    # is exactly the one production's own evaluation recorded, not an approximation of it.
    assert reg2["metric"] == "accuracy" and reg2["previous_production_score"] == evaluation["accuracy"]
    assert reg2["production"] == reg2["previous_production"] == "1"
    assert "accuracy" in reg2["reason"]
    assert client.get_model_version_by_alias(name, "production").version == "1"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    assert client.get_model_version(name, "2").tags["gate.decision"] == "rejected"
    assert "v2 rejected" in client.get_model_version(name, "1").tags["gate.last_challenge"]

    # 3. Promote by hand, then roll back; every move is recorded.
    moved = _stage("promote", "--version", "2", "--reason", "canary")
    assert moved["production"] == "2" and moved["from"] == "1"
    v2 = client.get_model_version(name, "2").tags
    assert v2["production.reason"] == "canary" and v2["production.previous"] == "1" and v2["production.by"]
    back = _stage("promote", "--rollback")
    assert back["production"] == "1" and back["from"] == "2"
    assert client.get_model_version_by_alias(name, "production").version == "1"
    from imgclf.registry import versions as registry

    assert [h["action"] for h in registry.history(client, name)] == ["gate", "manual", "rollback"]
    # one readable tag per move, in time order, and no second copy of them
    keys = sorted(k for k in client.get_registered_model(name).tags if k.startswith("production.history"))
    assert len(keys) == 3 and [k.rsplit(" ", 3)[1:] for k in keys] == [["none", "to", "v1"], ["v1", "to", "v2"],
                                                                        ["v2", "to", "v1"]], keys

    bad = cli("promote", "--version", "999")
    assert bad.exit_code == 1 and "has no version 999" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    # 4. predict through the production alias, without unpickling anything.
    images, labels = separable_digits(20, seed=9)
    files = []
    for i, img in enumerate(images):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(img).convert("RGB" if i % 2 else "L").save(path)  # any mode works
        files.append(str(path))
    out = _stage("predict", *files, env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"})
    predicted = [line.split("\t")[1] for line in out.strip().splitlines()]
    assert predicted == [str(int(y)) for y in labels]

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    res = cli("predict", str(text))
    assert res.exit_code == 1 and f"{text}: not an image" in res.stderr
    res = cli("predict", files[0], "--model-uri", f"models:/{name}/77")
    assert res.exit_code == 1 and f"models:/{name}/77: cannot load model" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unreachable_server_fails_fast(tiny_workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    res = cli("train", "--set", "runtime.tracking.enabled=true")
    assert res.exit_code == 1 and "http://127.0.0.1:9 is unreachable" in res.stderr
    assert not (tiny_workdir / "models").exists()


def test_failing_run_ends_failed(tracked_workdir, mlflow_server):
    res = cli("train", "--set", "model.kind=mlp", "--set", "train.optimizer=sgd", "--set", "train.lr=1e12",
              "--set", "train.schedule=none")
    assert res.exit_code == 1 and "loss is" in res.stderr
    cfg = config.load("params.yaml")
    client = _client(mlflow_server)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_secrets_stay_out_of_params(tiny_workdir, mlflow_server, monkeypatch):
    from imgclf.tracking.lineage import flat_params
    from imgclf.urls import redact

    cfg = config.from_dict({}, {"runtime.tracking.uri": "https://alice:s3cret@mlflow.example.com/?token=abc"})
    assert not any("s3cret" in v or "mlflow.example" in v for v in flat_params(cfg).values())  # runtime: no param
    assert "s3cret" not in redact("http://alice:s3cret@host:5000/x")
    # A password holding '/', '?', '#' or '@' ends urlsplit's netloc early: no part of it may show.
    for password in ("pa/ss/word", "pa?ss", "p#a@ss", "a/b@c"):
        assert redact(f"http://alice:{password}@host:5000/x?y=1") == "http://host:5000/x"
    res = cli("train", "--set", "runtime.tracking.enabled=true", "--set", "runtime.tracking.uri=http://alice:top/secret@127.0.0.1:9")
    assert res.exit_code == 1 and "127.0.0.1:9" in res.stderr and "secret" not in res.stderr, res.stderr
    assert redact("sqlite:////abs/path@x/mlflow.db") == "sqlite:////abs/path@x/mlflow.db"


def test_server_keeps_host_and_path_checks(mlflow_server):
    req = urllib.request.Request(mlflow_server + "/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": "evil.example.com"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(mlflow_server + "/get-artifact?path=../../etc/passwd&run_uuid=abc", timeout=10)
    assert exc.value.code == 400


@pytest.mark.slow
def test_served_model_answers(tracked_workdir, mlflow_server):
    for stage in ("train", "evaluate", "register"):
        _stage(stage)
    name = config.load("params.yaml").model_name
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@production",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                            stdout=open(tracked_workdir / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            # it runs `uvicorn` by name: the project's environment first on PATH, however pytest started
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{(tracked_workdir / 'serve.log').read_text()[-3000:]}") from None
        images, labels = separable_digits(6, seed=11)
        body = json.dumps({"inputs": (images[:, None].astype(np.float32) / 255).tolist()}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            preds = np.asarray(json.loads(resp.read())["predictions"])
        assert preds.shape == (6, 10) and np.allclose(preds.sum(1), 1, atol=1e-4)
        assert list(preds.argmax(1)) == list(labels)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def test_predict_on_the_embedded_store(tiny_workdir, tmp_path, monkeypatch):
    """No server, no $MLFLOW_TRACKING_URI: predict finds the registered model in mlflow/mlflow.db and
    leaves no stray store in the working directory."""
    from .helpers import TINY_OVERRIDES, write_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A one-epoch model, promoted whatever its calibration: this test is about where predict finds it.
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "register.min_score": 0.0, "register.max_ece": 1.0,
                                                "evaluate.perturbations": [], "train.max_epochs": 1})
    for stage in ("train", "evaluate", "register"):
        _stage(stage)
    x, _ = separable_digits(1, 5)
    Image.fromarray(x[0]).save(tmp_path / "digit.png")
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "predict", str(tmp_path / "digit.png")],
                         cwd=tiny_workdir, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(str(tmp_path / "digit.png") + "\t")
    assert not (tiny_workdir / "mlflow.db").exists()
