"""Interrupted later stages leave true records: Ctrl-C in evaluate does not turn a finished training into a
KILLED run, and a register killed between creating the version and moving `challenger` is finished by the
rerun. The embedded store, the real CLI in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import mlflow

from .helpers import TINY_OVERRIDES, cli, write_params

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _run(*args: str, cwd) -> dict:
    res = cli(*args)  # in this process (cwd is the workdir); the interrupted stage gets its own below
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_interrupted_evaluate_and_register_leave_true_records(tiny_workdir, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "register.min_score": 0.0, "train.max_epochs": 1})
    store = f"sqlite:///{tiny_workdir / 'mlflow/mlflow.db'}"
    client = mlflow.MlflowClient(store, store)
    run_id = _run("train", cwd=tiny_workdir)["run_id"]

    def evaluate_started():
        proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "evaluate"], cwd=tiny_workdir, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while client.get_run(run_id).data.tags.get("stage.evaluate") != "started":
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        return proc

    proc = evaluate_started()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]
    run = client.get_run(run_id)
    assert run.data.tags["stage.evaluate"] == "killed", err[-2000:]
    assert run.info.status == "FINISHED", "a finished training was marked by an interrupted evaluate"
    # SIGKILL (or its server gone when it fails): nothing runs after, and the training's run is still FINISHED.
    proc = evaluate_started()
    proc.kill()
    proc.communicate(timeout=60)
    assert client.get_run(run_id).info.status == "FINISHED", "a killed evaluate left the training's run RUNNING"
    _run("evaluate", cwd=tiny_workdir)  # and the next evaluate goes on with it
    assert _run("register", cwd=tiny_workdir)["version"] == "1"

    # A second training whose register was killed right after creating its version: challenger still on v1.
    second = _run("train", "--set", "train.seed=1", cwd=tiny_workdir)["run_id"]
    _run("evaluate", "--set", "train.seed=1", cwd=tiny_workdir)
    logged = json.loads((tiny_workdir / "models/logged_model.json").read_text())
    source = client.get_logged_model(logged["model_uri"].split("/")[-1]).artifact_location
    client.create_model_version("imgclf-mnist", source, run_id=second)
    assert str(client.get_model_version_by_alias("imgclf-mnist", "challenger").version) == "1"
    again = _run("register", "--set", "train.seed=1", cwd=tiny_workdir)
    assert again["version"] == "2" and not again["created"]
    assert str(client.get_model_version_by_alias("imgclf-mnist", "challenger").version) == "2"


_DROPPED_CTRL_C = """
import os, signal
from imgclf.config import load
from imgclf.console import exit_on_signals
from imgclf.tracking.runs import run_context


class Collected:
    def __del__(self):  # Ctrl-C lands while garbage is collected: Python prints its exception and drops it
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):
            pass


exit_on_signals()
with run_context(load("params.yaml", []), run_name="dropped", stage="evaluate") as run:
    print(run.run_id, flush=True)
    Collected()
    print("the stage went on", flush=True)
"""


def test_a_ctrl_c_whose_exception_python_dropped_still_ends_the_stage_killed(tiny_workdir):
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True})
    proc = subprocess.run([sys.executable, "-c", _DROPPED_CTRL_C], cwd=tiny_workdir, env=_env(),
                          capture_output=True, text=True, timeout=300)
    run_id, went_on = proc.stdout.split()[0], proc.stdout.splitlines()[1:]
    assert went_on == ["the stage went on"] and "Exception ignored" in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode != 0, proc.stderr[-2000:]
    store = f"sqlite:///{tiny_workdir / 'mlflow/mlflow.db'}"
    run = mlflow.MlflowClient(store, store).get_run(run_id)
    assert (run.info.status, run.data.tags["stage.evaluate"]) == ("KILLED", "killed")
