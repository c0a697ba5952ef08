"""Test helpers: tiny real data sets (IDX, PNG), a loopback HTTP mirror, real servers and processes."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import yaml

from imgclf import config
from imgclf.data.synthetic import MNIST_NAMES, make_mnist_dir, separable_digits  # noqa: F401  (the tests' tiny data)
from imgclf.ops.stack import free_port  # noqa: F401  (the tests' one helper for it)

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
# Under CI=true (.ci/run) a test whose prerequisite is missing fails, naming it: a green CI run proves all it
# claims. Elsewhere it skips with the same line, so a laptop without Chromium or PostgreSQL can still run the rest.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(present: bool, what: str) -> None:
    """Skip (or, under CI=true, fail) the calling test when `what` is missing."""
    import pytest

    if not present:
        (pytest.fail if STRICT else pytest.skip)(f"missing prerequisite: {what}")


class MirrorServer:
    """A loopback HTTP server over a folder; `faults[name]` is a list of status codes served first."""

    def __init__(self, root: Path):
        self.root = root
        self.faults: dict[str, list[int]] = {}
        self.requests: list[str] = []
        self.auth: str | None = None  # an Authorization header every request must carry (else 401)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
                if outer.auth is not None and self.headers.get("Authorization") != outer.auth:
                    self.send_error(401)
                    return
                queue = outer.faults.get(name)
                if queue:
                    self.send_error(queue.pop(0))
                    return
                path = outer.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def write_params(path: Path, overrides: dict) -> Path:
    """The repo's params.yaml with dotted overrides applied (validated like the CLI does)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    merged = config.apply_overrides(raw, overrides)
    config.from_dict(merged)  # fail here, not later, on a typo in a test
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def cli(*args: str, env: dict | None = None):
    """Run the real `imgclf` entry point in-process; returns click's Result."""
    from click.testing import CliRunner

    from imgclf.cli import main

    return CliRunner().invoke(main, list(args), env={**os.environ, **(env or {})}, catch_exceptions=False)


TINY_OVERRIDES = {
    "model.cnn.channels": [8, 16], "model.cnn.convs_per_block": 1, "model.cnn.head_hidden": [32],
    "model.mlp.hidden": [64], "train.max_epochs": 4, "train.batch_size": 32, "train.patience": 10,
    "train.lr": 0.01, "runtime.threads": 1, "runtime.device": "cpu",
    "train.augment_shift": 0,  # the separable test images encode the class in 2-pixel bands
    # ... so a shift changes their class. Tests train for an epoch or two: every behavioural test runs, one is
    # gated loosely (tests/test_trust.py holds the gate to real limits)
    "evaluate.perturbations": [{"kind": "shift", "size": 1}, {"kind": "rotate", "size": 10},
                               {"kind": "noise", "size": 0.05, "max_drop": 0.5}, {"kind": "invert"}],
    "runtime.tracking.enabled": False,
}


# A small CNN for real-MNIST subsets of a few thousand images: the tests of the gate and of monitoring.
SMALL_REAL_MNIST = {
    "model.cnn.channels": [8, 16], "model.cnn.convs_per_block": 1, "model.cnn.head_hidden": [32],
    "train.max_epochs": 2, "train.batch_size": 64, "runtime.threads": 2, "paths.dvc_file": None,
    "register.min_score": 0.5, "evaluate.perturbations": [{"kind": "shift", "size": 1}],
}


def imgclf(*args: str, cwd: Path, env: dict | None = None, module: str = "imgclf.cli") -> subprocess.Popen:
    """The real `imgclf` command (or `python -m flows` with module="flows") in its own process,
    to be killed, signalled or run side by side."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout: float = 120.0, what: str = "condition", every: float = 0.01) -> None:
    """Poll `predicate` every `every` seconds until true; fail with the process's output if it ends or time runs
    out first. A file check can poll at 100 Hz; one that asks a server gives a longer `every`: the suite's two
    cores are its limit, and a server answering 100 queries a second takes them from the work it waits for."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            output = "".join(o or "" for o in proc.communicate())
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{output[-3000:]}")
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def wait_http(url: str, proc, timeout: float = 90.0) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class MlflowServer:
    """A real `mlflow server` (the project's own command) on a loopback port; can be stopped and started again."""

    def __init__(self, store: Path, port: int | None = None):
        self.store, self.port = store, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> "MlflowServer":
        import subprocess

        from imgclf.ops.servers import mlflow_server_command

        log = open(self.store / "server.log", "ab")
        cmd, env = mlflow_server_command(self.store, port=self.port)
        self.proc = subprocess.Popen(cmd, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            wait_http(self.url + "/health", self.proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def registry_with_versions(store: Path, versions: int, name: str = "m"):
    """A real SQLite registry (in `store`) holding `versions` versions of model `name`, v1 in production; its
    client. The versions point at `store` itself: for the gate's logic, whose scores the test gives."""
    import mlflow
    from imgclf.registry.versions import move_production

    uri = f"sqlite:///{store / 'store.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model(name)
    for _ in range(versions):
        client.create_model_version(name, str(store))
    move_production(client, name, "1", "first")
    return client


def runs_of(tracking_uri: str, experiment: str) -> list:
    """The MLflow runs of an experiment, oldest first ([] while it does not exist)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []


class Processes:
    """What a test starts with `python -m MODULE` from the repo in its environment: servers and workers left
    running (each in a process group of its own, output in `logs/<log>`; `stop_groups(p.started)` ends them),
    and commands run to the end, their stdout returned (a non-zero exit fails the test unless `ok=False`)."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.started = env, logs, []

    def start(self, *args: str, log: str, module: str = "prefect") -> subprocess.Popen:
        self.started.append(subprocess.Popen([sys.executable, "-m", module, *args], env=self.env, cwd=REPO,
                                             stdout=open(self.logs / log, "wb"), stderr=subprocess.STDOUT,
                                             start_new_session=True))
        return self.started[-1]

    def run(self, *args: str, module: str = "prefect", timeout: float = 300, ok: bool = True) -> str:
        out = subprocess.run([sys.executable, "-m", module, *args], env=self.env, cwd=REPO, capture_output=True,
                             text=True, timeout=timeout)
        assert out.returncode == 0 or not ok, f"{module} {' '.join(args)}:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out.stdout


def stop_groups(procs) -> None:
    """SIGTERM each process group (servers, workers and their children), then SIGKILL what is left after 30 s."""
    import signal

    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
