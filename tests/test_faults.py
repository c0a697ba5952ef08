"""Faults fed for real: processes killed mid-epoch and mid-write, a full disk, SIGTERM/Ctrl-C, timeouts."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mlflow
from imgclf.training.checkpoint import load_checkpoint

from .helpers import TINY_OVERRIDES, cli, imgclf, make_mnist_dir, require, runs_of, wait_for, write_params

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers

LONG = {**TINY_OVERRIDES, "train.max_epochs": 5, "train.patience": 100}


def checkpoint_epoch(path: Path) -> int:
    try:
        return load_checkpoint(path)["epoch"] if path.is_file() else 0
    except ValueError:
        return 0


@pytest.fixture
def slow_workdir(workdir):
    """Enough tiny data that an epoch takes a visible fraction of a second on one thread."""
    make_mnist_dir(workdir / "data/raw/mnist", n_train=4000, n_test=200)
    write_params(workdir / "params.yaml", LONG)
    assert cli("prepare").exit_code == 0
    return workdir


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(slow_workdir, tmp_path, mlflow_server):
    reference = tmp_path / "reference"
    shutil.copytree(slow_workdir, reference)
    env = {"MLFLOW_TRACKING_URI": mlflow_server}
    write_params(slow_workdir / "params.yaml", {**LONG, "runtime.tracking.enabled": True,
                                                   "runtime.tracking.experiment": "sigkill"})

    proc = imgclf("train", cwd=slow_workdir, env=env)
    ckpt = slow_workdir / "models/checkpoint.pt"
    wait_for(lambda: checkpoint_epoch(ckpt) >= 2, proc, what="the epoch-2 checkpoint")
    time.sleep(0.15)  # into epoch 3
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_epoch(ckpt)
    assert 2 <= killed_at < LONG["train.max_epochs"]
    run_id = load_checkpoint(ckpt)["extra"]["run_id"]  # run.json is written only when a training ends well
    assert not (slow_workdir / "models/run.json").exists()

    # Runtime keys are not part of the checkpoint's identity: a resume may change them.
    resumed = imgclf("train", "--resume", "--set", "runtime.threads=1", "--set", "runtime.eval_batch_size=77",
                     "--set", "runtime.memory_limit_gb=64", cwd=slow_workdir, env=env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"checkpoint.pt after epoch {killed_at}" in err

    os.chdir(reference)
    assert cli("train").exit_code == 0
    got = torch.load(slow_workdir / "models/best.pt", weights_only=True)["state_dict"]
    want = torch.load(reference / "models/best.pt", weights_only=True)["state_dict"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    history = [json.loads((d / "metrics/train.json").read_text())["history"] for d in (slow_workdir, reference)]
    assert [h["val_loss"] for h in history[0]] == [h["val_loss"] for h in history[1]]
    assert len(history[0]) == LONG["train.max_epochs"]

    # The resumed training carried on in the same MLflow run: no run left RUNNING, no epoch missing.
    client = mlflow.MlflowClient(mlflow_server)
    assert json.loads((slow_workdir / "models/run.json").read_text())["run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run_id, "epoch/val_loss")}
    assert steps == set(range(1, LONG["train.max_epochs"] + 1))
    assert client.get_run(run_id).data.tags["train.resumed_after_epochs"] == str(killed_at)
    assert json.loads((slow_workdir / "metrics/train.json").read_text())["resumed_after_epochs"] == [killed_at]
    assert "train.checkpoint" not in client.get_run(run_id).data.tags  # a local training uploads no checkpoint


def test_checkpoint_artifacts_resume_only_from_a_whole_upload(tmp_path):
    """Two slots in turn, the tags naming the last whole one; a slot whose bytes are not the tagged ones
    (an upload cut short by a dying worker, a hand edit) is refused in one line, nothing written."""
    from imgclf import config
    from imgclf.tracking.remote import fetch_checkpoint, upload_checkpoint
    from imgclf.tracking.store import connect

    cfg = config.load(str(write_params(tmp_path / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                                  "paths.mlflow_dir": str(tmp_path / "mlflow")})), {})
    client, experiment_id = connect(cfg.tracking)
    run_id = client.create_run(experiment_id).info.run_id
    dest = tmp_path / "worker/models/checkpoint.pt"
    assert fetch_checkpoint(cfg, run_id, dest) is None and not dest.exists()
    for epoch in (1, 2, 3):
        (tmp_path / "checkpoint.pt").write_bytes(f"epoch {epoch}".encode())
        upload_checkpoint(client, run_id, tmp_path / "checkpoint.pt", epoch)
    assert fetch_checkpoint(cfg, run_id, dest) == 3 and dest.read_bytes() == b"epoch 3"
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/slot-0", "checkpoints/slot-1"}
    dest.unlink()
    (tmp_path / "checkpoint.pt").write_bytes(b"half an upload")
    client.log_artifact(run_id, str(tmp_path / "checkpoint.pt"), "checkpoints/slot-1")  # over the tagged slot
    with pytest.raises(ValueError, match=r"checkpoints/slot-1/checkpoint.pt does not match its tag train.checkpoint_sha256"):
        fetch_checkpoint(cfg, run_id, dest)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_a_silent_train_run_counts_as_lost_after_two_of_its_beats():
    from flows.pipeline import silence_limit

    assert silence_limit(90, "30") == 90 and silence_limit(31, "30") == 75
    assert silence_limit(90, None) == silence_limit(90, "off") == 375  # Prefect's default beat: 180 s
    assert silence_limit(600, "180") == 600


def test_sigkill_while_checkpoint_is_written(tmp_path):
    """Killed in the middle of writing a big checkpoint: the previous one loads, no temp file anywhere."""
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    script = (
        "import sys, torch\nfrom pathlib import Path\nfrom imgclf.training.checkpoint import save_torch\n"
        "p = Path(sys.argv[1])\nsave_torch(p, {'epoch': 1, 'w': torch.ones(10)})\nprint('saved', flush=True)\n"
        "save_torch(p, {'epoch': 2, 'w': torch.zeros(60_000_000)})\nprint('second saved', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(ckpt)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    io_file = Path(f"/proc/{proc.pid}/io")

    def written() -> int:
        try:
            return int(dict(line.split(": ") for line in io_file.read_text().splitlines())["wchar"])
        except (OSError, KeyError):
            return 0

    base = written()
    wait_for(lambda: written() > base + 20_000_000, proc, what="the second checkpoint half-written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout.read() == ""  # it never finished the second write
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]


def _can_mount_tmpfs(path: Path) -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_during_checkpoint_keeps_the_previous_one(tiny_workdir, tmp_path):
    """`train` with its out_dir on a tmpfs that holds one checkpoint but not two at once."""
    disk = tmp_path / "disk"
    disk.mkdir()
    require(shutil.which("unshare") is not None and _can_mount_tmpfs(disk), "a tmpfs mount in a user namespace (unshare -rm)")
    write_params(tiny_workdir / "params.yaml", {**LONG, "train.max_epochs": 1})
    assert cli("train").exit_code == 0
    size = (tiny_workdir / "models/checkpoint.pt").stat().st_size
    limit_kb = (size * 3 // 2) // 1024
    write_params(tiny_workdir / "params.yaml", {**LONG, "paths.models_dir": str(disk)})
    check = ("import json, os, sys\nfrom imgclf.training.checkpoint import load_checkpoint\n"
             f"d = {str(disk)!r}\n"
             "print(json.dumps({'files': sorted(os.listdir(d)), 'epoch': load_checkpoint(d + '/checkpoint.pt')['epoch']}))")
    inner = (f"mount -t tmpfs -o size={limit_kb}k tmpfs {disk} && "
             f"{sys.executable} -m imgclf.cli train; echo \"train-exit=$?\" >&2; {sys.executable} -c \"$CHECK\"")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", inner], cwd=tiny_workdir, capture_output=True, text=True,
                         env={**os.environ, "CHECK": check}, timeout=300)
    assert "train-exit=1" in out.stderr, out.stderr[-3000:]
    error_lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "checkpoint.pt" in error_lines[0] and "No space left" in error_lines[0], error_lines
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state == {"files": ["checkpoint.pt"], "epoch": 1}, state


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_ends_mlflow_run_killed(tracked_workdir, mlflow_server, sig):
    write_params(tracked_workdir / "params.yaml", {**LONG, "train.max_epochs": 1000, "runtime.tracking.enabled": True,
                                                   "runtime.tracking.experiment": "signals"})
    proc = imgclf("train", cwd=tracked_workdir, env={"MLFLOW_TRACKING_URI": mlflow_server})
    ckpt = tracked_workdir / "models/checkpoint.pt"
    wait_for(lambda: checkpoint_epoch(ckpt) >= 1, proc, what="the first checkpoint")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    run_id = load_checkpoint(ckpt)["extra"]["run_id"]
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED", err[-2000:]
    assert not (tracked_workdir / "models/run.json").exists()  # no record of a training that did not end
    assert load_checkpoint(ckpt)["epoch"] >= 1
    assert not [p for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")]


def test_train_timeout_really_stops(tracked_workdir, mlflow_server):
    write_params(tracked_workdir / "params.yaml", {**LONG, "train.max_epochs": 100000, "runtime.tracking.enabled": True,
                                                   "runtime.tracking.experiment": "timeout"})
    start = time.monotonic()
    res = cli("train", "--set", "runtime.orchestration.train_timeout_s=3")
    assert time.monotonic() - start < 30
    assert res.exit_code == 1 and "timeout" in res.output, res.output
    (run,) = runs_of(mlflow_server, "timeout")
    assert run.info.status == "FAILED" and run.data.tags["stage.train"] == "failed"
    ckpt = tracked_workdir / "models/checkpoint.pt"
    assert not ckpt.exists() or load_checkpoint(ckpt)["epoch"] >= 1  # on a loaded machine no epoch may have ended


def test_prefect_server_is_not_exposed_without_an_auth_string(workdir):
    from imgclf.ops.servers import prefect_server_command

    with pytest.raises(ValueError, match="PREFECT_SERVER_API_AUTH_STRING"):
        prefect_server_command("0.0.0.0", 4200, environ={})
    for weak in ("x", "u:p", ":a-long-enough-password", "admin:"):  # no user:password, or a short password
        with pytest.raises(ValueError, match="'user:password' with a password of at least 12"):
            prefect_server_command("127.0.0.1", 4200, environ={"PREFECT_SERVER_API_AUTH_STRING": weak})
    cmd, env = prefect_server_command("0.0.0.0", 4200,
                                      environ={"PREFECT_SERVER_API_AUTH_STRING": "u:a-long-enough-password"})
    assert env["PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"] == "true" and cmd[-3:] == ["0.0.0.0", "--port", "4200"]
    res = cli("prefect-server", "--host", "0.0.0.0", env={"PREFECT_SERVER_API_AUTH_STRING": ""})
    assert res.exit_code == 1 and res.stderr.strip().count("\n") == 0 and "AUTH_STRING" in res.stderr


def test_prefect_server_ui_asks_its_own_port():
    """The UI finds its API on the port the server was started on, not Prefect's default 4200 nor a
    PREFECT_API_URL naming another server; a PREFECT_UI_API_URL the user set (a proxy) stays."""
    from imgclf.ops.servers import prefect_server_command

    _, env = prefect_server_command("127.0.0.1", 4321, environ={"PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    assert env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    _, env = prefect_server_command("127.0.0.1", 4321, environ={"PREFECT_UI_API_URL": "https://proxy/prefect/api"})
    assert env["PREFECT_UI_API_URL"] == "https://proxy/prefect/api"
