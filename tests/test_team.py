"""The team setup, for real: `imgclf stack up` (PostgreSQL cluster + SeaweedFS S3 on loopback, generated
credentials), MLflow with basic auth over PostgreSQL and the bucket, Prefect on PostgreSQL, a pipeline
worker in a checkout and a training worker in another folder (own HOME, own environment without the
project installed) that fetches the code from git at the deployed commit; then DVC through the S3 remote."""

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgclf.files import tree_digest
from imgclf.ops.stack_servers import pg_bin as _pg_bin

from .helpers import REPO, TINY_OVERRIDES, free_port, stop_groups, wait_http, write_params

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


SKIP_TOP = {".venv", ".git", "data", "models", "metrics", "reports", "mlflow", ".dvc-remote", ".stack", "dvc_plots",
            ".pytest_cache", ".ruff_cache"}


def _checkout_and_origin(checkout: Path, origin: Path) -> str:
    """The working tree as it is (whether or not REPO is a git checkout) committed into a fresh repository,
    and a bare clone of it: the team's remote. Returns the commit."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = SKIP_TOP if Path(folder) == REPO else set()
        inner = {"cache", "tmp", "config.local"} if Path(folder) == REPO / ".dvc" else set()
        return {n for n in names if n in top or n in inner or n == "__pycache__"}

    shutil.copytree(REPO, checkout, ignore=ignore)
    env = {**os.environ, "GIT_AUTHOR_NAME": "ci", "GIT_AUTHOR_EMAIL": "ci@example.com", "GIT_COMMITTER_NAME": "ci",
           "GIT_COMMITTER_EMAIL": "ci@example.com"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "deployed"]):
        subprocess.run(cmd, cwd=checkout, env=env, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(origin)], check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()


def test_deployment_on_the_team_stack(tmp_path, shared_mnist):
    try:
        _pg_bin("initdb")
    except Exception as exc:
        pytest.skip(f"{exc}; .ci/run installs it")
    checkout, state_dir = tmp_path / "checkout", tmp_path / "state"
    commit = _checkout_and_origin(checkout, tmp_path / "origin.git")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "IMGCLF_"))}
    base["PYTHONPATH"] = str(checkout)  # the pipeline side runs the checkout's flows

    procs: list[subprocess.Popen] = []

    def start(cmd, log, env, cwd):
        procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=open(tmp_path / log, "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    imgclf = [sys.executable, "-m", "imgclf.cli"]
    stack = _exports(_run([*imgclf, "stack", "up", "--dir", str(state_dir)], base, checkout, timeout=180))
    try:
        assert (state_dir / "stack.json").stat().st_mode & 0o077 == 0  # credentials: owner only
        assert stack == _exports(_run([*imgclf, "stack", "env", "--dir", str(state_dir)], base, checkout))
        assert "secret_access_key" in (checkout / ".dvc/config.local").read_text()
        tracked = subprocess.run(["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True)
        assert ".dvc/config" not in tracked.stdout  # credentials stay out of git
        # A sweep's study goes to the stack's PostgreSQL (`stack up` made the database), heartbeats included.
        probe = ("import os, optuna; from imgclf.sweep.study import storage; s = optuna.create_study("
                 "study_name='probe', storage=storage(os.environ['IMGCLF_STUDY_STORAGE'])); t = s.ask(); "
                 "s._storage.record_heartbeat(t._trial_id); s.tell(t, 1.0); print(len(s.trials))")
        assert stack["IMGCLF_STUDY_STORAGE"].endswith("/optuna")
        assert _run([sys.executable, "-c", probe], {**base, **stack}, checkout).strip().endswith("1")

        mlflow_port, prefect_port = free_port(), free_port()
        admin = secrets.token_urlsafe(16)
        server_env = {**base, **stack, "MLFLOW_AUTH_ADMIN_PASSWORD": admin}
        mlflow_server = start([*imgclf, "ui", "--port", str(mlflow_port), "--auth"], "mlflow.log", server_env, checkout)
        prefect_env = {**base, **stack, "PREFECT_HOME": str(tmp_path / "prefect-server"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        prefect_server = start([*imgclf, "prefect-server", "--port", str(prefect_port)], "prefect.log", prefect_env,
                               checkout)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow_server, timeout=180)
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", prefect_server, timeout=180)

        # Clients hold URLs and their own credentials only: no database, no S3 keys.
        client = {"PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                  "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "MLFLOW_TRACKING_USERNAME": "admin",
                  "MLFLOW_TRACKING_PASSWORD": admin, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        pipeline_env = {**base, **client, "PREFECT_HOME": str(tmp_path / "prefect-pipeline")}
        write_params(checkout / "team-params.yaml", {
            **TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 1, "train.batch_size": 256,
            "register.min_score": 0.0, "register.model_name": "team", "runtime.tracking.experiment": "team",
            "runtime.download.mirrors": [str(shared_mnist)]})
        prefect = [sys.executable, "-m", "prefect"]
        _run([*prefect, "work-pool", "create", "default", "--type", "process"], pipeline_env, checkout)
        _run([*prefect, "work-pool", "create", "gpu", "--type", "process"], pipeline_env, checkout)
        _run([*prefect, "work-pool", "set-concurrency-limit", "gpu", "1"], pipeline_env, checkout)
        out = _run([sys.executable, "-m", "flows.deploy", "--params", "team-params.yaml",
                    "--train-source", (tmp_path / "origin.git").as_uri()], pipeline_env, checkout)
        assert "train/gpu" in out

        start([*prefect, "worker", "start", "--pool", "default"], "worker-pipeline.log", pipeline_env, checkout)
        trainer = tmp_path / "trainer"
        (trainer / "home").mkdir(parents=True)
        python = _trainer_python(trainer)
        trainer_env = {"PATH": "/usr/bin:/bin", "HOME": str(trainer / "home"), "LANG": "C.UTF-8", **client}
        start([str(python), "-m", "prefect", "worker", "start", "--pool", "gpu", "--limit", "1"], "worker-gpu.log",
              trainer_env, trainer)

        t0 = time.perf_counter()
        run_out = _run([*prefect, "deployment", "run", "training-pipeline/mnist-cnn", "--watch", "--watch-timeout",
                        "600"], pipeline_env, checkout, timeout=700)
        wall = time.perf_counter() - t0
        assert "Completed" in run_out, run_out[-3000:]

        import boto3
        import psycopg

        import mlflow

        os.environ.update({"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin})
        try:
            ml = mlflow.MlflowClient(client["MLFLOW_TRACKING_URI"])
            prod = ml.get_model_version_by_alias("team", "production")
            run = ml.get_run(prod.run_id)
        finally:
            for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(k)
        # Training ran on the second worker, from the commit deployed, fetched by the worker itself.
        code = Path(run.data.tags["worker.code"])
        assert not code.is_relative_to(checkout) and not code.is_relative_to(REPO), code
        assert run.data.tags["worker.commit"] == commit
        # The model and the hand-off live in the bucket; the registry rows in PostgreSQL.
        s3 = boto3.client("s3", endpoint_url=stack["MLFLOW_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=stack["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=stack["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
                for o in page.get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/outputs/train/best.pt") for k in keys), keys[:20]
        assert any(k.endswith("MLmodel") for k in keys), keys[:20]
        dsn = stack["MLFLOW_BACKEND_STORE_URI"].replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT version, run_id FROM model_versions WHERE name = 'team'").fetchall()
        assert rows == [(1, run.info.run_id)]
        with psycopg.connect(dsn.rsplit("/", 1)[0] + "/prefect") as conn:
            states = dict(conn.execute("SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON r.flow_id = f.id")
                          .fetchall())
        assert states == {"training-pipeline": "COMPLETED", "train": "COMPLETED"}
        pool = _run([*prefect, "work-pool", "inspect", "gpu"], pipeline_env, checkout)
        assert "concurrency_limit=1" in pool.replace(" ", "").replace("'", "")

        # DVC: the raw data the pipeline recorded goes to the bucket and comes back into an empty cache.
        dvc = [sys.executable, "-m", "dvc"]
        digest = tree_digest(checkout / "data/raw")
        pushed = [{"Key": o["Key"]} for o in s3.list_objects_v2(Bucket="dvc").get("Contents", [])]
        assert pushed  # the download stage pushed on its own; push again from an empty bucket, timed
        s3.delete_objects(Bucket="dvc", Delete={"Objects": pushed})
        t1 = time.perf_counter()
        _run([*dvc, "push", "data.dvc"], base, checkout)
        push = time.perf_counter() - t1
        assert any(k.startswith("imgclf/") for k in
                   [o["Key"] for o in s3.list_objects_v2(Bucket="dvc").get("Contents", [])])
        shutil.rmtree(checkout / ".dvc/cache")
        shutil.rmtree(checkout / "data/raw")
        t2 = time.perf_counter()
        _run([*dvc, "pull", "data.dvc"], base, checkout)
        pull = time.perf_counter() - t2
        assert tree_digest(checkout / "data/raw") == digest
        print(f"\nteam stack: deployment run wall {wall:.1f}s; dvc push {push:.1f}s, pull {pull:.1f}s "
              f"({sum(p.stat().st_size for p in (checkout / 'data/raw').rglob('*') if p.is_file()) / 1e6:.1f} MB)")
    finally:
        stop_groups(procs)
        subprocess.run([*imgclf, "stack", "down", "--dir", str(state_dir)], env=base, cwd=checkout, timeout=120)
    assert not (state_dir / "stack.json").exists()


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
