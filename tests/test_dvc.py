"""`dvc repro` over the real dvc.yaml, in a temporary copy of the repo (own git repo, own remote), tiny data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from imgclf.files import tree_digest
from imgclf.ops.versioning import track_raw

from .helpers import REPO, TINY_OVERRIDES, cli, make_mnist_dir, wait_for, write_params

pytestmark = pytest.mark.slow
# dvc runs `imgclf ...`: the project's environment comes first on PATH, however pytest was started.
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def sh(*args, cwd, check=True) -> str:
    out = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=ENV)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr


def dvc(*args, cwd, check=True) -> str:
    return sh(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def ran(output: str) -> list[str]:
    return [s for s in ("prepare", "audit", "train", "evaluate", "register") if f"Running stage '{s}'" in output]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    return make_project(tmp_path, monkeypatch)


def make_project(tmp_path, monkeypatch) -> Path:
    """A tiny DVC project: this repo's dvc.yaml and code, generated MNIST-shaped data, its own git and remote."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".gitignore", "data/corrections.csv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                        "register.min_score": 0.0, "train.max_epochs": 1})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "ci@example.com", cwd=root)
    sh("git", "config", "user.name", "ci", cwd=root)
    dvc("init", "-q", cwd=root)
    shutil.copy(REPO / ".dvc/config", root / ".dvc/config")  # the project's cache link types and plots page
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots")
    dvc("remote", "add", "-d", "-f", "local", str(tmp_path / "remote"), cwd=root)
    make_mnist_dir(root / "data/raw/mnist", n_train=300, n_test=100)
    record = track_raw("data/raw", "data.dvc", root=root)  # what the download stage does
    assert record["pushed"] and record["md5"].endswith(".dir")
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny project", cwd=root)
    return root


def trained_with(repo: Path) -> tuple[str, str, float]:
    """The model kind and learning rate of the workspace's last training: MLflow's logged param, and the peak
    rate its optimizer really had (OneCycle's max_lr, in the checkpoint)."""
    import torch

    from mlflow import MlflowClient

    run_id = json.loads((repo / "metrics/train.json").read_text())["run_id"]
    params = MlflowClient(f"sqlite:///{repo}/mlflow/mlflow.db").get_run(run_id).data.params
    groups = torch.load(repo / "models/checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    return params["model.kind"], params["train.lr"], groups[0]["max_lr"]


@pytest.mark.slow
def test_queued_experiments_track_into_the_repositorys_own_store(repo):
    """`dvc exp run --queue -S ...` twice, then `dvc queue start -j 2`: each experiment runs in a DVC temporary
    workspace (.dvc/tmp/exps/<tmp>/, deleted afterwards), yet both MLflow runs, their models and registry
    versions are in the repository's mlflow/, each trained with its own -S values, and `dvc exp show` has the
    test accuracy MLflow has."""
    import time

    from mlflow import MlflowClient

    dvc("exp", "run", "--queue", "-S", "train.lr=0.002", cwd=repo)
    dvc("exp", "run", "--queue", "-S", "train.lr=0.05", "-S", "model.kind=mlp", "-S", "train.max_epochs=2", cwd=repo)
    try:
        # Not through a pipe: the workers it starts inherit its stdout, and a worker that hangs in its own shutdown
        # (celery's monitor asked it to stop mid-task once, under load) kept `queue start` from returning.
        with open(repo.parent / "queue-start.log", "w") as out:
            starter = subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=repo, env=ENV,
                                       stdout=out, stderr=subprocess.STDOUT)
            assert starter.wait(timeout=120) == 0, (repo.parent / "queue-start.log").read_text()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = dvc("queue", "status", cwd=repo)
            if status.count("Success") + status.count("Failed") >= 2:
                break
            time.sleep(3)
        assert status.count("Success") == 2, status + "\n" + dvc("queue", "logs", status.split()[-4], cwd=repo,
                                                                   check=False)
    finally:
        dvc("queue", "stop", "--kill", cwd=repo, check=False)
    client = MlflowClient(f"sqlite:///{repo}/mlflow/mlflow.db")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "train.lr" in r.data.params and r.data.tags.get("mlflow.parentRunId") is None]
    trained = sorted((r.data.params["model.kind"], r.data.params["train.lr"], r.data.params["train.max_epochs"])
                     for r in runs)
    assert trained == [("cnn", "0.002", "1"), ("mlp", "0.05", "2")], trained
    # ... and the rate that ran: the MLP's OneCycle schedule, peaking at -S 0.05 a quarter of the way in, is
    # still far above the MLP's own default (0.001) at the end of its first epoch.
    (mlp,) = [r for r in runs if r.data.params["model.kind"] == "mlp"]
    lr = {m.step: m.value for m in client.get_metric_history(mlp.info.run_id, "epoch/lr")}
    assert lr[1] > 0.01, lr
    versions = client.search_model_versions()
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    shown = json.dumps(json.loads(dvc("exp", "show", "--json", cwd=repo)))
    for r in runs:
        assert f'"accuracy": {r.data.metrics["test_accuracy"]}' in shown, (r.data.metrics, shown[:3000])
    assert not list((repo / ".dvc/tmp/exps").glob("*/mlflow/mlflow.db"))


def test_repro_noop_param_changes_experiments_and_pull(repo, monkeypatch, caplog):
    first = dvc("repro", cwd=repo)
    assert ran(first) == ["prepare", "audit", "train", "evaluate", "register"], ran(first)
    assert (repo / "data/audit/label_issues.csv").is_file()
    registered = json.loads((repo / "models/registered.json").read_text())
    assert registered["version"] == "1" and registered["promoted"]
    assert json.loads((repo / "metrics/test.json").read_text())["accuracy"] > 0.5

    # Nothing changed: nothing runs, nothing is registered again.
    assert "up to date" in dvc("status", cwd=repo)
    assert ran(dvc("repro", cwd=repo)) == []
    assert json.loads((repo / "models/registered.json").read_text())["version"] == "1"

    # Nor does editing code that says how a stage runs (the CLI, the console); the training loop is another thing.
    for presentation in ("src/imgclf/console.py", "src/imgclf/cli/__init__.py", "src/imgclf/tracking/runs.py"):
        with open(repo / presentation, "a") as fh:
            fh.write("# an edited comment\n")
    assert "up to date" in dvc("status", cwd=repo)
    loop = repo / "src/imgclf/training/loop.py"
    kept = loop.read_text()
    loop.write_text(kept + "# an edited comment\n")
    assert "src/imgclf/training/loop.py" in dvc("status", cwd=repo)
    loop.write_text(kept)

    # Runtime and path keys never make DVC rerun anything.
    params = (repo / "params.yaml").read_text()
    edited = yaml.safe_load(params)
    edited["runtime"].update(threads=2, eval_batch_size=123, memory_limit_gb=1.5, device="cpu")
    edited["runtime"]["download"].update(retries=7, timeout_s=5.0, mirrors=["http://127.0.0.1:1/"])
    edited["paths"].update(mlflow_dir="elsewhere-mlflow", dvc_file="other.dvc")
    (repo / "params.yaml").write_text(yaml.safe_dump(edited))
    assert "up to date" in dvc("status", cwd=repo)
    (repo / "params.yaml").write_text(params)

    # A reviewed correction is a change of the data: prepare, and everything after it, reruns.
    fixes = repo / "data/corrections.csv"
    header = fixes.read_text()
    fixes.write_text(header + "train-images-idx3-ubyte.gz:0,drop,a blank scan,ci\n")
    assert "data/corrections.csv" in dvc("status", "prepare", cwd=repo)
    fixes.write_text(header)
    assert "up to date" in dvc("status", cwd=repo)

    # `dvc metrics show`: the numbers people compare, not the run's bookkeeping (that stays in train.json/test.json).
    metrics_show = dvc("metrics", "show", cwd=repo)
    assert "test_scores.json" in metrics_show and "accuracy" in metrics_show and "kept_epoch" in metrics_show
    assert not any(k in metrics_show for k in ("run_id", "device", "threads", "robust_", "history")), metrics_show
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "first results", cwd=repo)

    # A stage run outside DVC records itself in dvc.lock (the two-pipelines test below holds that, through the
    # stage functions the CLI shares), but not a run with an override, and it says why (here in this process:
    # the entry point's own code, without another interpreter to start).
    monkeypatch.chdir(repo)
    caplog.clear()
    res = cli("train", "--set", "train.lr=0.02")
    assert res.exit_code == 0, res.output[-3000:]
    assert "train not recorded: it ran with train other than params.yaml says" in caplog.text, caplog.text[-3000:]
    # A training into other folders (a sweep trial's, a worker's) never stood for the stage: not offered, no word.
    caplog.clear()
    res = cli("train", "--set", "paths.models_dir=elsewhere", "--set", "paths.metrics_dir=elsewhere-metrics")
    assert res.exit_code == 0 and "dvc.lock" not in caplog.text and (repo / "elsewhere/best.pt").is_file()
    assert "train:" in dvc("status", cwd=repo)  # dvc.lock still describes the training params.yaml makes
    shutil.rmtree(repo / "elsewhere"), shutil.rmtree(repo / "elsewhere-metrics")

    # A training param reruns train and what follows, not prepare.
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("lr: 0.01", "lr: 0.02", 1))
    assert ran(dvc("repro", cwd=repo)) == ["train", "evaluate", "register"]
    assert "train.lr" in dvc("params", "diff", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "second results", cwd=repo)

    # An experiment with another learning rate gives another metric; `-S train.lr` is the rate that runs (the
    # optimizer's own peak rate, not the CNN's default; the MLP's -S rate is held in the queued-experiments test
    # above). A data param in it reruns from prepare.
    before = json.loads((repo / "metrics/train.json").read_text())["kept_val_loss"]
    assert ran(dvc("exp", "run", "-S", "train.lr=0.0005", "-S", "data.val_fraction=0.25", cwd=repo))[:1] == ["prepare"]
    after = json.loads((repo / "metrics/train.json").read_text())["kept_val_loss"]
    assert after != before
    assert trained_with(repo) == ("cnn", "0.0005", 0.0005)
    table = dvc("exp", "show", "--csv", cwd=repo)
    assert "train.lr" in table.splitlines()[0] and "0.0005" in table and "0.02" in table

    # Push, lose the workspace copy and the cache, pull: same data, same hash.
    raw_digest = tree_digest(repo / "data/raw")
    dvc("push", cwd=repo)
    assert "up to date" in dvc("status", "-c", cwd=repo).lower() or "in sync" in dvc("status", "-c", cwd=repo).lower()
    shutil.rmtree(repo / "data/raw")
    shutil.rmtree(repo / ".dvc/cache")
    dvc("pull", "data.dvc", cwd=repo)
    assert tree_digest(repo / "data/raw") == raw_digest


def test_repro_killed_mid_stage_recovers(repo):
    """SIGKILL to `dvc repro` (and its stage process) while train runs; the next repro reruns train and on."""
    import signal

    write_params(repo / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "register.min_score": 0.0,
                                        "train.max_epochs": 20, "train.patience": 1000})
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=repo, start_new_session=True, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = repo / "models/checkpoint.pt"
    wait_for(checkpoint.is_file, proc, timeout=240, what="train's first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    killed_output = proc.communicate()[0]
    assert [s for s in ran(killed_output) if s != "audit"] == ["prepare", "train"]
    assert not (repo / "models/best.pt").exists()

    again = dvc("repro", cwd=repo)
    assert [s for s in ran(again) if s != "audit"] == ["train", "evaluate", "register"], again[-3000:]
    assert json.loads((repo / "metrics/train.json").read_text())["epochs_run"] == 20
    assert "up to date" in dvc("status", cwd=repo)


def test_the_committed_dvc_lock_is_current(tmp_path, shared_mnist):
    """A fresh checkout plus the data download: every code dep and param in dvc.lock matches, so `dvc status`
    reports only outputs that are not there yet (run scripts/pipeline and commit dvc.lock after code changes)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    root = tmp_path / "checkout"
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    sh("git", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "imgclf.cli", "download", "--mirror", str(shared_mnist), cwd=root)
    report = json.loads(dvc("status", "--json", cwd=root).strip().splitlines()[-1])
    wrong = {stage: change for stage, changes in report.items() for change in changes
             if not isinstance(change, dict) or any(v not in ("deleted", "not in cache") for kind in change.values()
                                                     for v in (kind.values() if isinstance(kind, dict) else [kind]))}
    assert not wrong, f"dvc.lock is stale (run scripts/pipeline and commit dvc.lock): {wrong}"


def test_two_pipelines_at_once_and_the_project_one_agrees_with_dvc(repo, shared_mnist, tmp_path):
    """README command 1's flow (`python -m flows`) twice at once on a fresh machine's embedded defaults: one
    MLflow SQLite store and one Prefect home (the local API) for both, one run in the DVC project and one in a
    plain folder. No lock errors, nothing lost, two versions, one production version.

    The project's run, outside DVC, records itself in dvc.lock: `dvc status` right after names only the audit
    stage (its own flow) and `dvc repro` runs only that (the stage functions record it, for the CLI as for the
    flow; a CLI run with an override saying why it is not recorded is in test_repro_noop_...)."""
    for folder in ("flows", "tasks"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(repo / "data/raw/mnist")
    store = tmp_path / "mlflow"
    together = {"paths.mlflow_dir": str(store), "register.model_name": "together",
                "runtime.tracking.experiment": "together"}
    # The flows download real MNIST; 5,000 images per split and batches of 256 keep it wiring (20 steps an epoch).
    small = {"train.batch_size": 256, "data.max_per_split": 5000}
    write_params(repo / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "register.min_score": 0.0,
                                        "train.max_epochs": 1, **small, **together})
    other = tmp_path / "other"
    other.mkdir()
    write_params(other / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "register.min_score": 0.0,
                                         "train.max_epochs": 2, **small, "paths.dvc_file": None,
                                         "runtime.download.mirrors": [str(shared_mnist)], **together})
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(repo)}
    for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):  # the embedded store, the local API
        env.pop(var, None)
    # --set train.max_epochs=1 is params.yaml's own value here: the run is what dvc.yaml runs.
    procs = [subprocess.Popen([sys.executable, "-m", "flows", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for cwd, args in ((repo, ["--mirror", str(shared_mnist), "--set", "train.max_epochs=1"]), (other, []))]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        lines = err.splitlines()
        bad = [i for i, line in enumerate(lines) if "database is locked" in line or "Traceback" in line]
        assert p.returncode == 0 and not bad, "\n".join(lines[max(0, bad[0] - 5):bad[0] + 40] if bad else lines[-40:])
    results = [json.loads(out) for out, _ in outs]
    assert sorted(r["registry"]["version"] for r in results) == ["1", "2"]
    from mlflow import MlflowClient

    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri, uri)
    for r, epochs in zip(results, (1, 2)):
        run = client.get_run(r["run_id"])
        assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
        assert [m.step for m in client.get_metric_history(r["run_id"], "epoch/val_loss")] == list(range(1, epochs + 1))
    production = client.get_model_version_by_alias("together", "production")
    assert str(production.version) in ("1", "2") and production.status == "READY"
    assert client.get_run(production.run_id).info.status == "FINISHED"

    # The training pipeline does not audit (the data-audit flow does): the audit stage alone is left to run.
    status = dvc("status", cwd=repo)
    assert "audit:" in status and not any(f"{s}:" in status for s in ("prepare", "train", "evaluate", "register")), \
        status + outs[0][1][-3000:]
    assert ran(dvc("repro", cwd=repo)) == ["audit"]
