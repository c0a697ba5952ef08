"""The user guide's server blocks (docs/*.md), run as pasted (bash, top to bottom) in a copy of the checkout
against real servers, so the guide cannot rot. Only what a test machine needs is changed: free ports for 4200 and 5000, one epoch
instead of three, the test suite's tiny model and 5,000 images per split in the copy's params.yaml, `uv run X` as
the test environment's X, workers that poll every 2 s, and the data from the local MNIST mirror.

Each block is also the one deployed stack its tests check: the block runs up to its last line (which stops what
it started), the test checks the servers, workers, stores and runs it left, then the last line runs and the test
checks that it stopped everything. The server block's test here also holds the deployment checks (auth and CSRF
on the Prefect server, the gpu pool's limit under a deployed sweep, lineage); the team block's test is
tests/test_team.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import REPO, TINY_OVERRIDES, free_port, write_params

DOCS = REPO / "docs"
COPY_SKIP = {".venv", ".git", "data", "models", "reports", "metrics", "mlflow", ".dvc-remote", ".stack", ".services",
             "dvc_plots", "inference", "inbox", ".pytest_cache", ".ruff_cache"}
# The copy's params.yaml: the tiny CNN and FAST settings of the wiring tests, 5,000 images per split of the real
# MNIST the block downloads (the block's own command still says which epochs; tests/test_trust.py and bench/
# hold the default model to its numbers).
BLOCK_PARAMS = {**TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.batch_size": 256, "register.min_score": 0.0,
                "data.max_per_split": 5000}


def doc_block(page: str, after: str) -> str:
    """The first ```bash block after the line that contains `after`, in a page of the user guide (docs/)."""
    text = (DOCS / page).read_text()
    start = text.index(after)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"no bash block after {after!r} in docs/{page}"
    return block.group(1)


def test_the_readme_links_and_pictures_are_there_and_short():
    """The front door stays one: under 200 lines, and every file it links or shows exists (mkdocs build --strict
    checks the guide's own links)."""
    text = (REPO / "README.md").read_text()
    assert text.count("\n") < 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len([t for t in targets if t.endswith(".png")]) >= 3
    missing = [t for t in targets if not t.startswith("http") and not (REPO / t).exists()]
    assert not missing, missing


@pytest.mark.integration
def test_every_bash_block_of_the_readme_and_the_guide_parses():
    """What the pasted-block tests below do not run still parses as bash, as a reader would paste it."""
    blocks = [(path.relative_to(REPO), block) for path in [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
              for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)]
    assert len(blocks) >= 10
    for where, block in blocks:
        out = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert out.returncode == 0, f"{where}: {out.stderr}\n{block}"


@pytest.mark.integration
def test_a_block_that_starts_servers_stops_at_its_first_error(tmp_path):
    """Pasted into an interactive shell a block runs on after a failed line (one cause, many errors, a stack torn
    down by its last line): every block that starts servers or workers is one `set -euo pipefail` subshell. And
    that subshell does stop: a failing line ends it before the next one runs."""
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    blocks = [(p.name, b) for p in pages for b in re.findall(r"```bash\n(.*?)```", p.read_text(), re.S)]
    starting = [(name, b) for name, b in blocks if re.search(r"--wait(?![-\w])|stack up|imgclf worker", b)]
    assert len(starting) >= 2
    for name, block in starting:
        lines = block.strip().splitlines()
        assert lines[0].startswith("(set -euo pipefail") and lines[-1] == ")", f"{name}: {lines[0]!r}"
    guard = starting[0][1].strip().splitlines()[0]
    marker = tmp_path / "ran-on"
    script = f"{guard}\nfalse\ntouch {marker}\n)\necho after $?\n"
    out = subprocess.run(["bash", "-i"], input=script, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PS1": ""})
    assert not marker.exists() and "after 1" in out.stdout, out.stdout + out.stderr


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class PastedBlock:
    """A block of the guide in a fresh copy of the checkout (its own git repository), run a part at a time in bash
    (`-euo pipefail`, as its subshell runs it pasted) with the environment each part leaves (`export`, `eval`)
    carried to the next."""

    def __init__(self, page: str, heading: str, last: str, tmp_path: Path, mirror: Path, env: dict | None = None):
        lines = doc_block(page, heading).strip().splitlines()
        # pasted as one subshell that stops at its first error; run here a part at a time under the same options
        assert lines[0].startswith("(set -euo pipefail") and lines[-1] == ")", "the block stops at its first error"
        self.lines = lines[1:-1]
        assert self.lines[-1].startswith(f"uv run {last}"), "the block ends by stopping what it started"
        self.tmp, self.ports = tmp_path, {"4200": free_port(), "5000": free_port()}
        self.work = tmp_path / "checkout"
        shutil.copytree(REPO, self.work, ignore=lambda d, names: [
            n for n in names if (Path(d) == REPO and n in COPY_SKIP) or n == "__pycache__"])
        write_params(self.work / "params.yaml", BLOCK_PARAMS)
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "readme"]):
            subprocess.run(cmd, cwd=self.work, check=True, capture_output=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_", "IMGCLF_"))}
        self.env = {**base, "PATH": f"{Path(sys.executable).parent}:{base['PATH']}",
                    "PREFECT_HOME": str(tmp_path / "prefect"), "IMGCLF_MIRROR": str(mirror),
                    "PYTHONPATH": str(self.work), "HOME": str(tmp_path / "home"), "COLUMNS": "200",
                    # Workers ask for work every 2 s, not 10: each hand-off (pipeline, train, every trial) waited
                    # 5 s on average for nothing.
                    "PREFECT_WORKER_QUERY_SECONDS": "2", **(env or {})}
        (tmp_path / "home").mkdir()
        self.parts = 0

    def adapt(self, line: str) -> str:
        line = line.replace("uv run ", "").replace('"train.max_epochs": 3', '"train.max_epochs": 1')
        for old, new in self.ports.items():
            line = line.replace(old, str(new))
        return line

    def run(self, lines: list[str], timeout: float = 900) -> str:
        """These lines, adapted, in one bash; fails the test (with both outputs) on a non-zero exit."""
        self.parts += 1
        env_out = self.tmp / f"env-{self.parts}"
        script = "\n".join(self.adapt(line) for line in lines) + f"\nenv -0 > {env_out}\n"
        out = subprocess.run(["bash", "-e", "-u", "-o", "pipefail", "-c", script], cwd=self.work, env=self.env,
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{out.stdout[-6000:]}\n--- stderr ---\n{out.stderr[-6000:]}"
        self.env = dict(item.split("=", 1) for item in env_out.read_text().split("\0") if "=" in item)
        return out.stdout

    def stop(self) -> None:
        """The block's last line; then nothing it started is left (services, ports)."""
        self.run(self.lines[-1:], timeout=300)
        assert not any((self.work / ".services").glob("*.json")), sorted((self.work / ".services").iterdir())
        assert not any(_listening(p) for p in self.ports.values()), self.ports

    def cleanup(self) -> None:
        subprocess.run([sys.executable, "-m", "imgclf.cli", "stop"], cwd=self.work, env=self.env, capture_output=True)


def assert_watched_run(out: str) -> None:
    """What `prefect deployment run ... --watch` printed: Completed, the result line with both links, and the
    child training's epochs relayed by the pipeline."""
    assert "Completed" in out, out[-6000:]
    text = " ".join(out.split())  # the watch output is wrapped to the terminal's width
    decision = r"(promoted to production|registered, not promoted)"
    assert re.search(rf"test accuracy \d+\.\d+%, macro F1 \S+; \S+ v\d+ {decision}.*MLflow run: http.*model version: http",
                     text), out[-6000:]
    assert re.search(r"train run \S+: epoch 1/1 train loss", text), out[-6000:]


def _status(url: str, auth: str | None = None, post: bool = False) -> int:
    import base64
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=b"{}" if post else None, method="POST" if post else "GET",
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_server_block_as_pasted_deploys_trains_on_the_gpu_pool_and_sweeps(tmp_path, shared_mnist, browser):
    """The server block (the project's Prefect server: CSRF on, here with an auth string; MLflow over the
    checkout's store; pools; `flows.deploy`; two workers; `prefect deployment run --watch`), then on the stack it
    left: a deployed sweep whose trials are child runs of train/gpu, one at a time, the run's lineage, and both
    UIs in a browser (tests/test_browser.py's check_pages)."""
    from .prefect_state import state
    from .test_browser import check_pages

    secret = "imgclf:not-a-real-password"  # the server wants it; clients (CLI, workers) send it themselves
    block = PastedBlock("orchestration.md", "With a server, work pools and workers", "imgclf stop", tmp_path, shared_mnist,
                        env={"PREFECT_SERVER_API_AUTH_STRING": secret, "PREFECT_API_AUTH_STRING": secret,
                             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"})
    api, tracking = f"http://127.0.0.1:{block.ports['4200']}/api", f"http://127.0.0.1:{block.ports['5000']}"
    try:
        out = block.run(block.lines[:-1])
        assert "training-pipeline/mnist-cnn" in out and "train/gpu" in out  # flows.deploy's list
        assert_watched_run(out)
        assert _status(f"{api}/admin/version") == 401  # no auth string
        assert _status(f"{api}/admin/version", auth=secret) == 200
        assert _status(f"{api}/flows/filter", auth=secret, post=True) == 403  # no CSRF token

        # A sweep whose trials are child flow runs of train/gpu; the pool takes one at a time.
        block.run(["uv run prefect work-pool set-concurrency-limit gpu 1"])
        # Not registered: test_flows.py's sweep test holds the best trial's registration (here a third evaluate).
        overrides = {"sweep.max_epochs": 1, "sweep.train_subset": 2000, "sweep.register": False,
                     "runtime.tracking.study_storage": f"sqlite:///{tmp_path}/optuna.db"}
        sweep_out = block.run(["uv run prefect deployment run hyperparameter-sweep/mnist-cnn --param trials=2 --param "
                               f"parallel=2 --param overrides='{json.dumps(overrides)}' --watch --watch-timeout 500"])
        assert "Completed" in sweep_out, sweep_out[-3000:]
        runs, reports, logs, sweep_reports = state(api, secret)
        train_run = min((r for r in runs if r["flow"] == "train" and r["parent"]), key=lambda r: r["start"])["id"]
        run = check_deployment(runs, reports, logs, sweep_reports, tracking, block)
        check_pages(browser, tracking, f"http://127.0.0.1:{block.ports['4200']}", run, tmp_path, epochs=1,
                    training_flow_run=train_run, prefect_auth=secret)
        block.stop()
    finally:
        block.cleanup()


def check_deployment(runs, reports, logs, sweep_reports, tracking: str, block: PastedBlock):
    """The deployed pipeline's and sweep's records on the live stack: Prefect's runs and logs, MLflow's runs."""
    import mlflow

    trials = sorted((r for r in runs if r["flow"] == "train" and r["parent"]), key=lambda r: r["start"])[1:]
    assert len(trials) == 2 and all(r["state"] == "COMPLETED" and r["pool"] == "gpu" for r in trials), runs
    assert trials[0]["end"] <= trials[1]["start"], trials  # the pool's limit of 1, though 2 were asked for at once
    sweep_run = next(r for r in runs if r["flow"] == "hyperparameter-sweep")
    assert sweep_run["state"] == "COMPLETED" and len(sweep_reports) == 1
    runs = [r for r in runs if r["flow"] != "hyperparameter-sweep" and r not in trials]
    for r in runs:
        r.pop("id"), r.pop("start"), r.pop("end"), r.pop("seconds")
    assert {"flow": "train", "pool": "gpu", "state": "COMPLETED", "parent": True} in runs, runs
    assert {"flow": "training-pipeline", "pool": "default", "state": "COMPLETED", "parent": False} in runs, runs
    # The worker's train flow run carries the library's per-epoch lines, not just Prefect's own.
    assert any(m.startswith("epoch 1/1 train loss") for m in logs["train"]), logs["train"][-20:]

    client = mlflow.MlflowClient(tracking)
    experiment = client.get_experiment_by_name("imgclf").experiment_id
    children = client.search_runs([experiment], filter_string="tags.`sweep.study` = 'imgclf-mnist-cnn'")
    trial_runs = [r for r in children if r.data.tags.get("sweep.trial")]
    assert len(trial_runs) == 2 and all(r.data.tags["worker.host"] and r.info.status == "FINISHED" for r in trial_runs)
    prod = client.get_model_version_by_alias("imgclf-mnist", "production")
    run = client.get_run(prod.run_id)
    assert run.data.tags.get("imgclf.train") == "remote"
    # Lineage: the params are the result settings (folders are paths, never params; the worker's temp folders
    # are worker.* tags), stage tags end finished, the run is named for what it is, and the links go both ways.
    assert run.data.params["train.max_epochs"] == "1" and not any(k.startswith("paths.") for k in run.data.params)
    assert run.data.tags["worker.paths.processed_dir"] not in ("", "data/processed", str(block.work / "data/processed"))
    assert all(run.data.tags[f"stage.{s}"] == "finished" for s in ("train", "evaluate", "register"))
    assert run.info.run_name.startswith("cnn-mnist-")
    assert run.data.tags["prefect.flow_run_url"].startswith(f"http://127.0.0.1:{block.ports['4200']}/runs/flow-run/")
    run_page = f"{tracking}/#/experiments/{experiment}/runs/{run.info.run_id}"
    assert run_page in prod.description
    assert len(reports) == 1 and run_page in reports[0]
    assert f"{tracking}/#/models/imgclf-mnist/versions/{prod.version}" in reports[0]
    assert len(client.get_metric_history(run.info.run_id, "epoch/val_acc")) == 1 and "test_accuracy" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "outputs/train")} >= {"outputs/train/best.pt"}
    assert json.loads((block.work / "metrics/train.json").read_text())["epochs_run"] == 1
    return run
