"""`imgclf sweep`: the search space validated like every key, the study beside the tracking store, and a sweep
SIGKILLed mid-trial that the same command finishes without redoing a trial or leaving one RUNNING."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from imgclf import config

from .helpers import REPO, TINY_OVERRIDES, cli, make_mnist_dir, write_params

SPACE = {"train.lr": {"log_uniform": [0.001, 0.02]}, "model.cnn.dropout": {"uniform": [0.0, 0.5]}}


@pytest.mark.parametrize("section, message", [
    ({"sweep.space": {"data.seed": {"int": [0, 3]}}}, "sweep.space.data.seed: not a hyperparameter"),
    ({"sweep.space": {"train.lrr": {"uniform": [0.0, 1.0]}}}, "sweep.space.train.lrr: train.lrr: unknown key"),
    ({"sweep.space": {"train.lr": {"log_uniform": [0, 0.1]}}}, "sweep.space.train.lr.log_uniform: low must be > 0"),
    ({"sweep.space": {"train.lr": {"normal": [0, 1]}}}, "sweep.space.train.lr: unknown range 'normal'"),
    ({"sweep.space": {"train.batch_size": {"choice": [0, 64]}}}, "sweep.space.train.batch_size: train.batch_size: "
                                                                 "must be >= 1"),
    ({"sweep.space": {"train.optimizer": {"choice": ["sgd", "adamm"]}}}, "sweep.space.train.optimizer"),
    ({"sweep.space": {"train.max_epochs": {"int": [1, 4]}}, "sweep.max_epochs": 3}, "sweep.max_epochs fixes it"),
    ({"sweep.pruner": "asha"}, "sweep.pruner: must be one of median, hyperband, none"),
    ({"sweep.trials": 0}, "sweep.trials: must be >= 1"),
    ({"sweep.metric": "test_acc"}, "sweep.metric: must be one of val_acc, val_loss"),
    ({"sweep.study": "../../../x"}, "sweep.study: letters, digits"),  # the study names folders: never a path
    ({"sweep.space": {}}, "sweep.space: empty"),
    ({"runtime.tracking.enabled": False}, "runtime.tracking.enabled: a sweep records its trials in MLflow"),
])
def test_a_bad_sweep_section_is_one_line_naming_the_key(workdir, section, message):
    raw = config.apply_overrides(__import__("yaml").safe_load((REPO / "params.yaml").read_text()), section)
    (workdir / "params.yaml").write_text(__import__("yaml").safe_dump(raw))
    result = cli("sweep", "--trials", "2")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output


@pytest.mark.parametrize("option, message", [(["--trials", "1000000000"], "sweep.trials: must be <= 100000"),
                                             (["--parallel", "100000"], "sweep.parallel: must be <= 256")])
def test_the_sweep_options_keep_their_settings_bounds(workdir, option, message):
    result = cli("sweep", *option)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_space_key_of_another_model_kind_is_refused_at_sweep_time(workdir):
    write_params(workdir / "params.yaml", {"sweep.space": {"model.mlp.dropout": {"uniform": [0.0, 0.5]}}})
    assert config.load("params.yaml").sweep.space  # valid params: another command need not care
    result = cli("sweep", "--trials", "2")
    assert result.exit_code == 2, result.output
    assert "sweep.space.model.mlp.dropout: the sweep trains model.kind=cnn" in result.output


def test_the_study_is_stored_beside_the_embedded_tracking_store(workdir, monkeypatch):
    from imgclf.sweep.study import storage_url, study_name

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("IMGCLF_STUDY_STORAGE", raising=False)
    cfg = config.load("params.yaml")
    assert storage_url(cfg) == f"sqlite:///{workdir / 'mlflow' / 'optuna.db'}"
    assert study_name(cfg) == "imgclf-mnist-cnn"
    monkeypatch.setenv("IMGCLF_STUDY_STORAGE", "postgresql+psycopg://u:p@db/optuna")
    assert storage_url(cfg) == "postgresql+psycopg://u:p@db/optuna"
    assert storage_url(config.load("params.yaml", ["runtime.tracking.study_storage=sqlite:///x.db"])) == "sqlite:///x.db"


def test_a_study_goes_on_only_with_the_same_settings_and_data(workdir):
    from imgclf.sweep.study import open_study

    url, cfg = f"sqlite:///{workdir / 'optuna.db'}", config.load("params.yaml")
    data = {"train.pt": "a" * 64, "val.pt": "b" * 64}
    open_study(cfg, url, "s", 4, data).enqueue_trial({})
    assert len(open_study(cfg, url, "s", 4, dict(data)).trials) == 1  # the same: it goes on
    with pytest.raises(config.ConfigError, match=r"other settings \(data_sha256.val.pt\)"):
        open_study(cfg, url, "s", 4, {**data, "val.pt": "c" * 64})  # re-prepared data, same params
    with pytest.raises(config.ConfigError, match=r"other settings \(sweep.max_epochs\)"):
        open_study(config.load("params.yaml", ["sweep.max_epochs=2"]), url, "s", 2, data)


def test_suggestions_stay_in_the_space_and_the_baseline_is_the_params(workdir):
    import optuna

    from imgclf.sweep.space import baseline, suggest

    write_params(workdir / "params.yaml", {"sweep.space": {
        **config.SweepConfig().space, "model.cnn.dropout": {"uniform": [0.0, 0.5]},
        "model.cnn.kernel_size": {"choice": [3, 5]}, "train.patience": {"int": [1, 3]}}})
    cfg = config.load("params.yaml")
    dims = cfg.sweep.dimensions
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.enqueue_trial(baseline(cfg, dims))  # patience 4 is outside [1, 3]: sampled, with a warning
    first = suggest(study.ask(), dims)
    assert {k: v for k, v in first.items() if k != "train.patience"} == {
        "train.lr": cfg.train.lr, "train.weight_decay": cfg.train.weight_decay, "train.batch_size": 128,
        "train.label_smoothing": 0.0, "model.cnn.dropout": 0.25, "model.cnn.kernel_size": 3}
    raw = __import__("yaml").safe_load((workdir / "params.yaml").read_text())
    for _ in range(20):
        values = suggest(study.ask(), dims)
        assert 0.0005 <= values["train.lr"] <= 0.02 and values["train.batch_size"] in (64, 128, 256)
        assert isinstance(values["train.batch_size"], int) and isinstance(values["train.patience"], int)
        assert 0.0 <= values["model.cnn.dropout"] <= 0.5 and 1 <= values["train.patience"] <= 3
        trial_cfg = config.from_dict(raw, values)  # what a trial runs: --set semantics, over the kind's section
        assert trial_cfg.train.lr == values["train.lr"] and trial_cfg.model.cnn.kernel_size == values["model.cnn.kernel_size"]


def _study(path):
    import optuna

    return optuna.load_study(study_name="imgclf-mnist-cnn", storage=f"sqlite:///{path / 'mlflow' / 'optuna.db'}")


@pytest.mark.slow
def test_a_sigkilled_sweep_resumes_and_leaves_nothing_running(workdir):
    """Killed with two trials in flight: the same command keeps the finished trials, fails and retries the two
    lost ones (their MLflow runs end KILLED), and finishes the rest; one parent run, FINISHED."""
    from optuna.trial import TrialState

    import mlflow

    make_mnist_dir(workdir / "data/raw/mnist", n_train=1500, n_test=100)
    write_params(workdir / "params.yaml", {
        **TINY_OVERRIDES, "runtime.tracking.enabled": True, "sweep.max_epochs": 6, "sweep.train_subset": None,
        "sweep.register": False, "sweep.space": SPACE, "sweep.pruner": "none"})
    assert cli("prepare").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "imgclf.cli", "sweep", "--trials", "6", "--parallel", "2"]
    proc = subprocess.Popen(command, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if " 3/6 done" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    before = {t.number: (t.state, t.value) for t in _study(workdir).trials if t.state == TrialState.COMPLETE}
    assert len(before) >= 3, "".join(seen[-30:])
    assert any(t.state == TrialState.RUNNING for t in _study(workdir).trials)
    again = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    trials = _study(workdir).trials
    assert {t.number: (t.state, t.value) for t in trials if t.number in before} == before  # kept, not redone
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6
    finished = [json.dumps(t.params, sort_keys=True) for t in trials if t.state == TrialState.COMPLETE]
    assert len(set(finished)) == 6, finished  # the resumed sampler does not replay the first run's draws
    lost = [t for t in trials if t.state == TrialState.FAIL]
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    assert lost and retried == {t.number for t in lost}
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("imgclf").experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    lost_runs = {t.user_attrs.get("mlflow_run_id") for t in lost} - {None}
    assert all(r.data.tags["sweep.state"] == "lost" for r in runs if r.info.run_id in lost_runs)
    assert sorted(r.data.tags["sweep.state"] for r in runs if r.data.tags.get("sweep.trial")) == \
        ["complete"] * 6 + ["lost"] * len(lost_runs)
    assert "retry of trial" in again.stderr


@pytest.mark.integration
def test_a_sweep_killed_while_its_workers_start_leaves_none_behind(workdir):
    """SIGKILL as soon as the first worker process exists (it is still importing): every process the sweep
    started is gone soon after, none left waiting on a queue that nobody writes."""
    import time

    import psutil

    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=100)
    write_params(workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "sweep.space": SPACE,
                                           "sweep.register": False})
    assert cli("prepare").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "sweep", "--trials", "4", "--parallel", "2"],
                            cwd=workdir, env=env, stderr=subprocess.DEVNULL)
    sweep, deadline, children = psutil.Process(proc.pid), time.monotonic() + 120, []
    while not children and proc.poll() is None and time.monotonic() < deadline:
        children = sweep.children(recursive=True)
        time.sleep(0.005)
    time.sleep(0.2)  # a worker past reading its start-up data, still importing (before its initializer)
    proc.kill()
    proc.wait(timeout=30)
    assert children, "the sweep started no worker"
    gone, alive = psutil.wait_procs(children, timeout=60)
    for p in alive:
        p.kill()
    assert not alive, [p.cmdline()[:4] for p in alive]


@pytest.mark.integration
def test_a_worker_whose_sweep_died_before_its_initializer_ends_at_once(tmp_path):
    """The exact window, without timing: the sweep is gone before the worker's initializer runs."""
    import time

    import psutil

    script = f"""
import os, sys, time
sweep = os.getpid()
if os.fork() == 0:
    while os.getppid() == sweep:
        time.sleep(0.01)
    open({str(tmp_path / "pid.tmp")!r}, "w").write(str(os.getpid()))
    os.replace({str(tmp_path / "pid.tmp")!r}, {str(tmp_path / "pid")!r})  # whole, or not there: never read empty
    from imgclf.sweep.local import _init_worker
    _init_worker(20, sweep)
    open({str(tmp_path / "survived")!r}, "w").close()
    os._exit(0)
"""
    subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO / "src")}, check=True,
                   timeout=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphan = int((tmp_path / "pid").read_text())
    while psutil.pid_exists(orphan) and psutil.Process(orphan).status() != psutil.STATUS_ZOMBIE \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (tmp_path / "survived").exists()


def test_a_forged_trial_in_the_study_never_becomes_the_best():
    """A trial written into the study database by someone else (a value no real trial reached, a learning rate
    outside the space, overrides naming another models folder) is left out; the best is a trial of the space."""
    import optuna
    from optuna.distributions import FloatDistribution

    from imgclf.sweep.space import best_trial

    cfg = config.from_dict({}, {"sweep.space": SPACE})
    dims = cfg.sweep.dimensions
    study = optuna.create_study(direction="maximize")
    space = {"train.lr": FloatDistribution(0.001, 0.02, log=True), "model.cnn.dropout": FloatDistribution(0.0, 0.5)}
    real = optuna.trial.create_trial(params={"train.lr": 0.01, "model.cnn.dropout": 0.2}, distributions=space,
                                     value=0.97, user_attrs={"mlflow_run_id": "a"})
    forged = [({"train.lr": 50.0, "model.cnn.dropout": 0.2}, {"mlflow_run_id": "b"}),  # outside the space
              ({"train.lr": 0.01}, {"mlflow_run_id": "c"}),  # a key missing
              ({"train.lr": 0.01, "model.cnn.dropout": 0.2}, {"overrides": {"paths.models_dir": "/elsewhere"}})]
    study.add_trial(real)
    for params, attrs in forged:
        dists = {k: FloatDistribution(0.0, 100.0) for k in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.99999, user_attrs=attrs))
    assert study.best_trial.value == 0.99999  # what Optuna alone would hand on
    best = best_trial(study, dims)
    assert (best.number, best.value, best.params) == (0, 0.97, real.params)


def test_a_damaged_study_database_is_one_line_naming_it(tmp_path):
    from imgclf.sweep.study import storage

    damaged = tmp_path / "optuna.db"
    damaged.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match=rf"sqlite:///{damaged}: not a study database Optuna can open \(file is not"):
        storage(f"sqlite:///{damaged}")
