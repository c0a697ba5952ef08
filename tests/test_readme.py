"""The README's server blocks, run as pasted (bash, top to bottom) in a copy of the checkout against real servers,
so the README cannot rot. Only what a test machine needs is changed: free ports for 4200 and 5000, one epoch
instead of three, `uv run X` as the test environment's X, and the data from the local MNIST mirror."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, free_port

README = REPO / "README.md"
COPY_SKIP = {".venv", ".git", "data", "models", "reports", "mlflow", ".dvc-remote", ".stack", ".services", "dvc_plots",
             "inference", "inbox", ".pytest_cache"}


def readme_block(after: str) -> str:
    """The first ```bash block after the line that contains `after`."""
    text = README.read_text()
    start = text.index(after)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {after!r} in README.md"
    return block.group(1)


def adapt(block: str, ports: dict[str, int]) -> str:
    script = block.replace("uv run ", "").replace('"train.max_epochs": 3', '"train.max_epochs": 1')
    for old, new in ports.items():
        script = script.replace(old, str(new))
    return script


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _copy(work: Path) -> None:
    shutil.copytree(REPO, work, ignore=lambda d, names: [n for n in names if Path(d) == REPO and n in COPY_SKIP])
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "readme"]):
        subprocess.run(cmd, cwd=work, check=True, capture_output=True)


BLOCKS = [
    pytest.param("With a server, work pools and workers", "imgclf stop", marks=pytest.mark.slow, id="server"),
    pytest.param("A real local stack for trying it", "imgclf stack down", marks=pytest.mark.team, id="team"),
]


@pytest.mark.parametrize("heading,last", BLOCKS)
def test_readme_block_runs_as_pasted(heading, last, tmp_path, shared_mnist):
    block = readme_block(heading)
    assert block.strip().splitlines()[-1].startswith(f"uv run {last}"), "the block ends by stopping what it started"
    if "stack up" in block and not (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        pytest.skip("no PostgreSQL server installed; .ci/run installs it")
    ports = {"4200": free_port(), "5000": free_port()}
    work = tmp_path / "checkout"
    _copy(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "IMGCLF_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "PREFECT_HOME": str(tmp_path / "prefect"),
                "IMGCLF_MIRROR": str(shared_mnist), "PYTHONPATH": str(work), "HOME": str(tmp_path / "home"),
                "COLUMNS": "200"})
    (tmp_path / "home").mkdir()
    script = adapt(block, ports)
    try:
        out = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                             text=True, timeout=1500)
    finally:
        subprocess.run([sys.executable, "-m", "imgclf.cli", "stop"], cwd=work, env=env, capture_output=True)
    log = out.stdout[-6000:] + "\n--- stderr ---\n" + out.stderr[-6000:]
    assert out.returncode == 0, log
    # The run finished and its last line says what happened, with both links.
    assert "Completed" in out.stdout, log
    text = " ".join(out.stdout.split())  # the watch output is wrapped to the terminal's width
    decision = r"(promoted to production|registered, not promoted)"
    assert re.search(rf"test accuracy \d+\.\d+%, macro F1 \S+; \S+ v\d+ {decision}.*MLflow run: http.*model version: http",
                     text), log
    assert re.search(r"train run \S+: epoch 1/1 train loss", text), log  # the child training, seen from --watch
    # ... and the last command stopped what the block started.
    assert not any((work / ".services").glob("*.json")), sorted((work / ".services").iterdir())
    assert not any(_listening(p) for p in ports.values()), ports
