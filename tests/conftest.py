"""Fixtures built from the helpers in helpers.py (real files, a real MLflow server, the real params.yaml)."""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest

from .helpers import (
    MNIST_NAMES,
    REPO,
    SHARED_MNIST,
    TINY_OVERRIDES,
    MirrorServer,
    MlflowServer,
    cli,
    make_mnist_dir,
    require,
    write_params,
)

# A suite started in the background without job control (`nohup scripts/test &`) inherits Ctrl-C ignored, and so
# would every stage it starts; the tests that press Ctrl-C need it delivered.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def tiny_mnist(tmp_path) -> tuple[Path, dict[str, str]]:
    src = tmp_path / "mirror"
    return src, make_mnist_dir(src)


@pytest.fixture
def shared_mnist() -> Path:
    require(all((SHARED_MNIST / n).is_file() for n in MNIST_NAMES),
            f"real MNIST in {SHARED_MNIST} (../shared beside the checkout)")
    return SHARED_MNIST


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


@pytest.fixture
def tiny_workdir(workdir) -> Path:
    """A workdir with tiny separable MNIST-like data prepared and a shrunk copy of params.yaml."""
    make_mnist_dir(workdir / "data/raw/mnist", n_train=300, n_test=100)
    write_params(workdir / "params.yaml", TINY_OVERRIDES)
    res = cli("prepare")
    assert res.exit_code == 0, res.output
    return workdir


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium on a machine with no internet: no background fetches, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def browser():
    require(CHROMIUM is not None, "Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    from playwright import sync_api  # a dev dependency: missing means a broken environment, not a skip

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


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
    write_params(tiny_workdir / "params.yaml", {**TINY_OVERRIDES, "runtime.tracking.enabled": True,
                                                "runtime.tracking.experiment": f"exp-{request.node.name}"[:60],
                                                "register.model_name": re.sub(r"[^A-Za-z0-9._-]", "-",
                                                                              f"m-{request.node.name}")[:60]})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return tiny_workdir


# The test layers. `-m unit`: fast tests of the library's logic on real (tiny) files, no servers and no
# subprocesses, under a minute on 2 cores. Everything else is `integration` (real MLflow/Prefect/DVC,
# processes, loopback servers) or `slow`/`team`. A test is unit unless marked otherwise, and the guard
# below fails a unit test that starts a process or opens a socket, so the layer cannot silently grow one.
_LAYERS = ("integration", "slow", "team")


@pytest.fixture(autouse=True)
def _unit_guard(request, monkeypatch):
    if request.node.get_closest_marker("unit") is None:
        return
    import socket
    import subprocess

    def refuse(what):
        def raiser(*args, **kwargs):
            raise AssertionError(f"a unit test may not {what}; mark it integration")
        return raiser

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("start a subprocess"))
    monkeypatch.setattr(socket.socket, "connect", refuse("open a connection"))
    monkeypatch.setattr(socket.socket, "bind", refuse("start a server"))


# Timeouts: pyproject's `timeout` holds every test to minutes; a slow or team test (whole pipelines, servers,
# the team stack) gets its layer's longer limit unless it names its own. A hung test then fails with its name
# and a stack trace, long before CI's own limit would end the run without one.
_LAYER_TIMEOUT_S = {"slow": 900, "team": 900}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(m) for m in _LAYERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("timeout") is None:
            for layer, seconds in _LAYER_TIMEOUT_S.items():
                if item.get_closest_marker(layer):
                    item.add_marker(pytest.mark.timeout(seconds))
                    break


def pytest_terminal_summary(terminalreporter):
    """Where the time went: the 25 slowest tests (setup + call + teardown) and the total per layer, so every
    run, CI's included, shows its own cost."""
    per_test: dict[str, float] = {}
    layer_of: dict[str, str] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) not in ("setup", "call", "teardown"):
                continue
            per_test[rep.nodeid] = per_test.get(rep.nodeid, 0.0) + rep.duration
            words = getattr(rep, "keywords", {})
            layer_of[rep.nodeid] = next((m for m in ("team", "slow", "integration") if m in words), "unit")
    if not per_test:
        return
    write = terminalreporter.write_line
    terminalreporter.section("slowest 25 tests (setup + call + teardown)")
    for nodeid, seconds in sorted(per_test.items(), key=lambda kv: -kv[1])[:25]:
        write(f"{seconds:8.1f}s  {layer_of[nodeid]:<11} {nodeid}")
    terminalreporter.section("test time per layer (summed over workers)")
    for layer in ("unit", "integration", "slow", "team"):
        tests = [s for n, s in per_test.items() if layer_of[n] == layer]
        write(f"{layer:<11} {len(tests):4d} tests {sum(tests):9.1f}s")
    write(f"{'all':<11} {len(per_test):4d} tests {sum(per_test.values()):9.1f}s")
