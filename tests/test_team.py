"""The team setup, for real, as the guide's team block (docs/team.md) pastes it: `imgclf stack up` (PostgreSQL cluster +
SeaweedFS S3 on loopback, generated credentials), MLflow with basic auth over PostgreSQL and the bucket, Prefect
on PostgreSQL, a pipeline worker in a checkout and a training worker in another folder (own HOME, own
environment without the project installed) that fetches the code from git at the deployed commit; then DVC
through the S3 remote."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclf.files import tree_digest
from imgclf.ops.stack import pg_bin as _pg_bin

from .helpers import REPO, require, stop_groups
from .test_readme import PastedBlock, assert_watched_run

pytestmark = [pytest.mark.team, pytest.mark.slow]


def _exports(text: str) -> dict[str, str]:
    import shlex

    return dict(shlex.split(line[len("export "):])[0].split("=", 1) for line in text.splitlines()
                if line.startswith("export "))


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float = 300) -> str:
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _trainer_python(where: Path) -> Path:
    """A Python with the locked dependencies but not the project: its code can only come from git."""
    # `uv run` names itself in $UV (CI may have uv only as `python3 -m uv`, which the venv's python lacks).
    uv = [os.environ["UV"]] if os.environ.get("UV") else [shutil.which("uv") or "uv"]
    req = where / "requirements.txt"
    subprocess.run([*uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-q", "-o", str(req)],
                   cwd=REPO, check=True, timeout=300)
    subprocess.run([*uv, "venv", "-q", "--python", sys.executable, str(where / "venv")], check=True, timeout=300)
    subprocess.run([*uv, "pip", "install", "-q", "--python", str(where / "venv/bin/python"), "-r", str(req)],
                   check=True, timeout=900)
    return where / "venv/bin/python"


def test_team_block_as_pasted_with_a_training_worker_that_has_only_the_dependencies(tmp_path, shared_mnist):
    """The guide's team block as pasted (tests/test_readme.py's PastedBlock), with one change: its training
    worker runs in another folder with its own HOME and a Python that has the locked dependencies but not the
    project, so the training's code can only come from git at the deployed commit (the server block runs the
    guide's own `imgclf worker --pool gpu`). On the stack the block leaves, before its last line: credentials,
    the sweep's study database, the run, the bucket, the registry and Prefect rows in PostgreSQL, DVC through S3."""
    try:
        _pg_bin("initdb")
    except Exception as exc:
        require(False, f"{exc}; .ci/run installs it")
    trainer = tmp_path / "trainer"
    (trainer / "home").mkdir(parents=True)
    python = _trainer_python(trainer)
    block = PastedBlock("team.md", "A real local stack for trying it", "imgclf stack down", tmp_path, shared_mnist,
                        env={"PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    work, lines = block.work, block.lines[:-1]
    (gpu,) = [i for i, line in enumerate(lines) if line.startswith("uv run imgclf worker --pool gpu")]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, capture_output=True, text=True).stdout.strip()
    procs: list[subprocess.Popen] = []
    try:
        out = block.run(lines[:gpu])  # stack, both servers, pools, the team's remote, deploy, the pipeline worker
        assert "train/gpu" in out
        env = block.env
        assert (work / ".stack/stack.json").stat().st_mode & 0o077 == 0  # credentials: owner only
        exports = _exports(_run([sys.executable, "-m", "imgclf.cli", "stack", "env"], env, work))
        assert exports and all(env[k] == v for k, v in exports.items())  # what `eval "$(stack up)"` set
        assert "secret_access_key" in (work / ".dvc/config.local").read_text()
        tracked = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True)
        assert ".dvc/config" not in tracked.stdout  # credentials stay out of git
        # A sweep's study goes to the stack's PostgreSQL (`stack up` made the database), heartbeats included.
        probe = ("import os, optuna; from imgclf.sweep.study import storage; s = optuna.create_study("
                 "study_name='probe', storage=storage(os.environ['IMGCLF_STUDY_STORAGE'])); t = s.ask(); "
                 "s._storage.record_heartbeat(t._trial_id); s.tell(t, 1.0); print(len(s.trials))")
        assert env["IMGCLF_STUDY_STORAGE"].endswith("/optuna")
        assert _run([sys.executable, "-c", probe], env, work).strip().endswith("1")

        # Clients hold URLs and their own credentials only: no database, no S3 keys.
        client = {k: env[k] for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                      "MLFLOW_TRACKING_PASSWORD", "PREFECT_SERVER_ANALYTICS_ENABLED")}
        trainer_env = {"PATH": "/usr/bin:/bin", "HOME": str(trainer / "home"), "LANG": "C.UTF-8", **client,
                       "PREFECT_WORKER_QUERY_SECONDS": env["PREFECT_WORKER_QUERY_SECONDS"]}  # the block's workers
        procs.append(subprocess.Popen([str(python), "-m", "prefect", "worker", "start", "--pool", "gpu", "--limit",
                                       "1"], env=trainer_env, cwd=trainer, stdout=open(tmp_path / "worker-gpu.log", "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        assert_watched_run(block.run(lines[gpu + 1:]))
        check_team_records(env, client, work, commit)
        stop_groups(procs)
        block.stop()
    finally:
        stop_groups(procs)
        block.cleanup()
        subprocess.run([sys.executable, "-m", "imgclf.cli", "stack", "down"], env=block.env, cwd=work, timeout=120,
                       capture_output=True)
    assert not (work / ".stack/stack.json").exists()


def check_team_records(env: dict, client: dict, checkout: Path, commit: str) -> None:
    import boto3
    import psycopg

    import mlflow

    os.environ.update({"MLFLOW_TRACKING_USERNAME": client["MLFLOW_TRACKING_USERNAME"],
                       "MLFLOW_TRACKING_PASSWORD": client["MLFLOW_TRACKING_PASSWORD"]})
    try:
        ml = mlflow.MlflowClient(client["MLFLOW_TRACKING_URI"])
        prod = ml.get_model_version_by_alias("imgclf-mnist", "production")
        run = ml.get_run(prod.run_id)
    finally:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(k)
    # Training ran on the second worker, from the commit deployed, fetched by the worker itself.
    code = Path(run.data.tags["worker.code"])
    assert not code.is_relative_to(checkout) and not code.is_relative_to(REPO), code
    assert run.data.tags["worker.commit"] == commit
    # The model and the hand-off live in the bucket; the registry rows in PostgreSQL.
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    assert any(k.endswith(f"{run.info.run_id}/artifacts/outputs/train/best.pt") for k in keys), keys[:20]
    assert any(k.endswith("MLmodel") for k in keys), keys[:20]
    dsn = env["MLFLOW_BACKEND_STORE_URI"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT version, run_id FROM model_versions WHERE name = 'imgclf-mnist'").fetchall()
    assert rows == [(1, run.info.run_id)]
    with psycopg.connect(dsn.rsplit("/", 1)[0] + "/prefect") as conn:
        states = dict(conn.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON r.flow_id = f.id")
                      .fetchall())
    assert states == {"training-pipeline": "COMPLETED", "train": "COMPLETED"}
    pool = _run([sys.executable, "-m", "prefect", "work-pool", "inspect", "gpu"], env, checkout)
    assert "concurrency_limit=1" in pool.replace(" ", "").replace("'", "")

    # DVC: the raw data the pipeline recorded goes to the bucket and comes back into an empty cache.
    dvc = [sys.executable, "-m", "dvc"]
    digest = tree_digest(checkout / "data/raw")
    pushed = [{"Key": o["Key"]} for o in s3.list_objects_v2(Bucket="dvc").get("Contents", [])]
    assert pushed  # the download stage pushed on its own; push again from an empty bucket, timed
    s3.delete_objects(Bucket="dvc", Delete={"Objects": pushed})
    t1 = time.perf_counter()
    _run([*dvc, "push", "data.dvc"], env, checkout)
    push = time.perf_counter() - t1
    assert any(k.startswith("imgclf/") for k in [o["Key"] for o in s3.list_objects_v2(Bucket="dvc").get("Contents", [])])
    shutil.rmtree(checkout / ".dvc/cache")
    shutil.rmtree(checkout / "data/raw")
    t2 = time.perf_counter()
    _run([*dvc, "pull", "data.dvc"], env, checkout)
    pull = time.perf_counter() - t2
    assert tree_digest(checkout / "data/raw") == digest
    print(f"\nteam stack: dvc push {push:.1f}s, pull {pull:.1f}s "
          f"({sum(p.stat().st_size for p in (checkout / 'data/raw').rglob('*') if p.is_file()) / 1e6:.1f} MB)")


def test_stack_env_without_a_stack_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "imgclf.cli", "stack", "env", "--dir", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == \
        f"error: {tmp_path / 'none' / 'stack.json'}: no stack here; start one with `imgclf stack up`"


def test_mlflow_server_on_team_backends_keeps_secrets_out_of_its_arguments(tmp_path):
    from imgclf.ops.servers import mlflow_server_command

    env = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg://u:pw@127.0.0.1:5432/mlflow",
           "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlflow/artifacts", "MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16,
           "IMGCLF_MLFLOW_AUTH_DATABASE_URI": "postgresql+psycopg://u:pw@127.0.0.1:5432/mlflow_auth"}
    cmd, out_env = mlflow_server_command(tmp_path / "store", auth=True, environ=env)
    assert not any("pw" in arg for arg in cmd)  # `ps` shows arguments to every user: the URIs go by environment
    assert out_env["MLFLOW_BACKEND_STORE_URI"] == env["MLFLOW_BACKEND_STORE_URI"]
    assert out_env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/artifacts"
    ini = Path(out_env["MLFLOW_AUTH_CONFIG_PATH"])
    assert "database_uri = postgresql+psycopg://u:pw@127.0.0.1:5432/mlflow_auth" in ini.read_text()
    assert ini.stat().st_mode & 0o077 == 0
