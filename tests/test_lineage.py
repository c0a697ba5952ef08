"""Trustworthy lineage: data -> run -> model version -> production, under failures and concurrency.
Real processes, a real MLflow server (stopped and started again), real git."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlflow
from imgclf import config

from .helpers import TINY_OVERRIDES, MlflowServer, cli, imgclf, make_mnist_dir, wait_for, write_params

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_refused_or_failed_stages_never_replace_the_good_record(tracked_workdir, mlflow_server):
    cfg = config.load("params.yaml")
    client = mlflow.MlflowClient(mlflow_server)
    assert cli("train").exit_code == 0
    good = _json(tracked_workdir / "models/run.json")
    best = _sha(tracked_workdir / "models/best.pt")
    assert good["best_sha256"] == best

    # A refused resume opens a run that ends FAILED; run.json and best.pt still name the good run.
    refused = cli("train", "--resume", "--set", "train.lr=0.05")
    assert refused.exit_code == 1 and "checkpoint" in refused.stderr
    assert _json(tracked_workdir / "models/run.json") == good and _sha(tracked_workdir / "models/best.pt") == best
    runs = _runs(client, cfg.tracking.experiment)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["stage.train"] == "failed"

    # evaluate adds to the good run, never to the failed one, and never revives it.
    assert cli("evaluate").exit_code == 0
    assert _json(tracked_workdir / "models/logged_model.json")["run_id"] == good["run_id"]
    assert client.get_run(failed[0].info.run_id).info.status == "FAILED"
    ok = client.get_run(good["run_id"])
    assert ok.info.status == "FINISHED" and ok.data.tags["stage.train"] == "finished"
    assert ok.data.tags["stage.evaluate"] == "finished"
    assert ok.info.run_name.startswith(f"{cfg.model.kind}-{cfg.data.source}-")

    # Weights that are not the recorded run's are refused, naming the run.
    (tracked_workdir / "models/best.pt").write_bytes((tracked_workdir / "models/checkpoint.pt").read_bytes())
    res = cli("evaluate")
    assert res.exit_code == 1 and good["run_id"] in res.stderr and "models/best.pt" in res.stderr


def test_register_refuses_an_evaluation_of_another_run(tracked_workdir, mlflow_server):
    cfg = config.load("params.yaml")
    client = mlflow.MlflowClient(mlflow_server)
    for stage in ("train", "evaluate", "register"):
        assert cli(stage).exit_code == 0
    first = _json(tracked_workdir / "models/run.json")["run_id"]
    assert cli("train").exit_code == 0  # a new run, not evaluated
    second = _json(tracked_workdir / "models/run.json")["run_id"]
    res = cli("register")
    assert res.exit_code == 1 and first in res.stderr and second in res.stderr, res.stderr
    versions = client.search_model_versions(f"name='{cfg.model_name}'")
    assert [v.run_id for v in versions] == [first]
    # A test split that changed since the evaluation is refused too.
    assert cli("evaluate").exit_code == 0
    meta = tracked_workdir / "data/processed/meta.json"
    record = _json(meta)
    record["sha256"]["test.pt"] = "0" * 64
    meta.write_text(json.dumps(record))
    res = cli("register")
    assert res.exit_code == 1 and "another test split" in res.stderr


@pytest.fixture
def slow_tracked(tracked_workdir):
    """Enough data that an epoch takes a visible moment on one thread."""
    make_mnist_dir(tracked_workdir / "data/raw/mnist", n_train=4000, n_test=200)
    assert cli("prepare").exit_code == 0
    return tracked_workdir


def test_one_writer_per_output_folder(slow_tracked, mlflow_server):
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    first = imgclf("train", "--set", "train.max_epochs=8", cwd=slow_tracked, env=env)
    lock = slow_tracked / ".models.lock"
    wait_for(lambda: lock.is_file() and "train (pid" in lock.read_text(), first, what="the first training's lock")
    start = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "imgclf.cli", "train"], cwd=slow_tracked,
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and time.monotonic() - start < 30
    line = [x for x in second.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and f"in use by train (pid {first.pid}" in line[0] and "--wait" in line[0]
    waiter = imgclf("train", "--wait", "--set", "train.max_epochs=2", cwd=slow_tracked, env=env)
    assert first.wait(timeout=300) == 0
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err[-2000:]
    # Whatever the order, the record is one training's: run.json, best.pt and train.json agree.
    record = _json(slow_tracked / "models/run.json")
    assert record["best_sha256"] == _sha(slow_tracked / "models/best.pt")
    assert _json(slow_tracked / "metrics/train.json")["run_id"] == record["run_id"] == json.loads(out)["run_id"]


def test_promote_is_idempotent_rollback_walks_back_and_promotes_serialize(tracked_workdir, mlflow_server, tmp_path):
    cfg = config.load("params.yaml")
    name, client = cfg.model_name, mlflow.MlflowClient(mlflow_server, mlflow_server)
    for stage in ("train", "evaluate", "register"):  # v1, production
        assert cli(stage).exit_code == 0
    logged = _json(tracked_workdir / "models/logged_model.json")
    for _ in range(3):  # v2..v4 from the same model files
        client.create_model_version(name, logged["model_uri"], run_id=logged["run_id"],
                                    model_id=logged["model_uri"].rsplit("/", 1)[-1])

    def promote(*args):
        res = cli("promote", *args)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    assert promote("--version", "2")["from"] == "1"
    again = promote("--version", "2")
    assert again["action"].startswith("none") and again["from"] == "2"
    promote("--version", "3")
    assert (promote("--rollback")["production"], promote("--rollback")["production"]) == ("2", "1")
    res = cli("promote", "--rollback")
    assert res.exit_code == 1 and "no earlier production version" in res.stderr

    # Two promotes at the same moment: both moves are in the history, the alias is the later one.
    before = len([k for k in client.get_registered_model(name).tags if k.startswith("production.history.")])
    procs = [imgclf("promote", "--version", v, cwd=tracked_workdir, env={"MLFLOW_TRACKING_URI": mlflow_server})
             for v in ("3", "4")]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    from imgclf.registry.versions import history

    entries = history(client, name)
    assert len(entries) == before + 2 and {e["to"] for e in entries[-2:]} == {"3", "4"}
    assert client.get_model_version_by_alias(name, "production").version == entries[-1]["to"]
    assert promote("--rollback")["production"] == entries[-2]["to"]


def test_git_dirty_ignores_what_the_pipeline_writes(tmp_path):
    from imgclf.tracking.lineage import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    for rel in ("params.yaml", "dvc.lock", "data.dvc", "metrics/train.json", "src/code.py", "src/a \"b\" ü.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a\n")
    git("add", ".")
    git("commit", "-qm", "init")
    # The second run as seen: only the metrics rewritten (the first status line, its leading space kept).
    (tmp_path / "metrics/train.json").write_text("b\n")
    assert git_state(tmp_path)["git.dirty"] == "false" and git_state(tmp_path)["git.modified"] == "none"
    for rel in ("dvc.lock", "data.dvc"):
        (tmp_path / rel).write_text("b\n")
    assert git_state(tmp_path)["git.dirty"] == "false" and git_state(tmp_path)["git.modified"] == "none"
    (tmp_path / "src/code.py").write_text("b\n")
    state = git_state(tmp_path)
    assert state["git.dirty"] == "true" and state["git.modified"] == "src/code.py"
    (tmp_path / "src/a \"b\" ü.py").write_text("b\n")  # git quotes such names without -z
    git("mv", "params.yaml", "renamed.yaml")
    modified = set(git_state(tmp_path)["git.modified"].split(","))
    assert modified == {"src/code.py", "src/a \"b\" ü.py", "renamed.yaml"}, modified


def _metric_steps(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "epoch/val_loss"))


@pytest.mark.slow
def test_tracking_outage_mid_training_loses_nothing(workdir, tmp_path):
    """The server dies mid-training: training goes on, metrics are journaled. (1) Back before the end: every
    epoch arrives, the run FINISHES. (2) Still gone at the end: exit 1 naming the run, then `imgclf sync`."""
    make_mnist_dir(workdir / "data/raw/mnist", n_train=4000, n_test=200)
    store = tmp_path / "store"
    store.mkdir()
    server = MlflowServer(store).start()
    write_params(workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.patience": 1000,
                                           "runtime.tracking.experiment": "outage"})
    env = {"MLFLOW_TRACKING_URI": server.url}
    os.environ["MLFLOW_TRACKING_URI"] = server.url
    try:
        assert cli("prepare").exit_code == 0
        client = mlflow.MlflowClient(server.url)
        timings = {}
        ckpt = workdir / "models/checkpoint.pt"
        from imgclf.training.checkpoint import load_checkpoint

        def epoch_done(n):
            try:
                return ckpt.is_file() and load_checkpoint(ckpt)["epoch"] >= n and \
                    load_checkpoint(ckpt)["extra"]["run_id"] is not None
            except ValueError:
                return False

        # Long enough for the server to come back (3 s down, then about 15 s to start on a slow 2-core machine,
        # where an epoch here takes about 0.9 s) while training still runs, with twice that to spare; then a
        # short one.
        for case, epochs in (("back before the end", 40), ("gone until the end", 8)):
            ckpt.unlink(missing_ok=True)
            proc = imgclf("train", "--set", f"train.max_epochs={epochs}", cwd=workdir, env=env)
            wait_for(lambda: epoch_done(2), proc, timeout=180, what="epoch 2")
            run_id = load_checkpoint(ckpt)["extra"]["run_id"]
            server.stop()
            lost = time.monotonic()
            if case == "back before the end":
                time.sleep(3)
                server.start()
                out, err = proc.communicate(timeout=600)
                assert proc.returncode == 0, err[-3000:]
                assert "tracking server unreachable" in err and "journaled rows sent" in err
            else:
                out, err = proc.communicate(timeout=600)
                timings["server loss to exit"] = round(time.monotonic() - lost, 1)
                assert proc.returncode == 1
                line = [x for x in err.splitlines() if x.startswith("error:")]
                assert len(line) == 1 and run_id in line[0] and "imgclf sync" in line[0], err[-3000:]
                assert (workdir / "models/run.json").is_file() and _json(workdir / "models/run.json")["run_id"] == run_id
                server.start()
                synced = cli("sync")
                assert synced.exit_code == 0, synced.output
                assert json.loads(synced.stdout)["synced"][0]["status"] == "FINISHED"
                assert not list((workdir / "models").glob("tracking-journal-*"))
            run = client.get_run(run_id)
            assert run.info.status == "FINISHED" and run.data.tags["stage.train"] == "finished"
            assert _metric_steps(client, run_id) == list(range(1, epochs + 1)), case
        print(json.dumps(timings))
        (tmp_path / "outage-timings.json").write_text(json.dumps(timings))
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        server.stop()
