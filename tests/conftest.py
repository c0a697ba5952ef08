"""Shared fixtures: tiny real data sets (IDX, PNG) and a loopback HTTP mirror."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from imgclf import config
from imgclf.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
MNIST_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def separable_digits(n: int, seed: int, n_classes: int = 10, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright horizontal band at a class-specific height: trivially learnable."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    band = size // n_classes
    for i, c in enumerate(labels):
        images[i, c * band: c * band + max(band, 1), :] = 255
    return images, labels.astype(np.uint8)


def make_mnist_dir(root: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, str]:
    """Write the four MNIST archives (tiny, separable) into `root`; return name -> md5."""
    root.mkdir(parents=True, exist_ok=True)
    tr_x, tr_y = separable_digits(n_train, seed)
    te_x, te_y = separable_digits(n_test, seed + 1)
    for name, arr in zip(MNIST_NAMES, (tr_x, tr_y, te_x, te_y)):
        write_idx(root / name, arr)
    return {name: hashlib.md5((root / name).read_bytes()).hexdigest() for name in MNIST_NAMES}


@pytest.fixture(autouse=True)
def _mlflow_uris_do_not_leak(monkeypatch):
    """mlflow.set_tracking_uri/set_registry_uri write process globals and env vars; undo them per test."""
    import sys

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # records the value before, restored after
        if not os.environ[var]:
            monkeypatch.delenv(var)
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        registry_utils._registry_uri = None
        tracking_utils._tracking_uri = None


@pytest.fixture
def tiny_mnist(tmp_path) -> tuple[Path, dict[str, str]]:
    src = tmp_path / "mirror"
    return src, make_mnist_dir(src)


@pytest.fixture
def shared_mnist() -> Path:
    if not all((SHARED_MNIST / n).is_file() for n in MNIST_NAMES):
        pytest.skip(f"real MNIST not found at {SHARED_MNIST}")
    return SHARED_MNIST


class MirrorServer:
    """A loopback HTTP server over a folder; `faults[name]` is a list of status codes served first."""

    def __init__(self, root: Path):
        self.root = root
        self.faults: dict[str, list[int]] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
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


@pytest.fixture
def mirror_server(tiny_mnist):
    server = MirrorServer(tiny_mnist[0])
    yield server
    server.close()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding the repo's real params.yaml (shrunk where tests need it)."""
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(wd)
    monkeypatch.delenv("IMGCLF_MIRROR", raising=False)
    return wd


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
    "model.mlp.hidden": [64], "model.mlp.train": {}, "train.max_epochs": 4, "train.batch_size": 32, "train.patience": 10,
    "train.lr": 0.01, "train.threads": 1, "train.device": "cpu",
    "train.augment_shift": 0,  # the separable test images encode the class in 2-pixel bands
    "tracking.enabled": False,
}


@pytest.fixture
def tiny_workdir(workdir) -> Path:
    """A workdir with tiny separable MNIST-like data prepared and a shrunk copy of params.yaml."""
    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=100)
    write_params(workdir / "params.yaml", TINY_OVERRIDES)
    res = cli("prepare")
    assert res.exit_code == 0, res.output
    return workdir


def imgclf(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The real `imgclf` command in its own process (to be killed, signalled or run side by side)."""
    import sys

    return subprocess.Popen([sys.executable, "-m", "imgclf.cli", *args], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll `predicate` until true; fail with the process's output if it ends or time runs out first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            output = "".join(o or "" for o in proc.communicate())
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{output[-3000:]}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

        from imgclf.servers import mlflow_server_command

        log = open(self.store / "server.log", "ab")
        self.proc = subprocess.Popen(mlflow_server_command(self.store, port=self.port), stdout=log,
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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One server for the session, SQLite + temp artifacts; yields its URL."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-store")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def tracked_workdir(tiny_workdir, mlflow_server, monkeypatch, request):
    """tiny_workdir with tracking on, pointed at the test server, a registered-model name of its own."""
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "tracking.enabled": True,
                                                "tracking.experiment": f"exp-{request.node.name}"[:60],
                                                "register.model_name": f"m-{request.node.name}"[:60]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return tiny_workdir
