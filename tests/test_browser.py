"""Both UIs in a real browser (headless Chromium from the system packages, driven by Playwright) after a
finished tiny pipeline: the MLflow run page opens in model-training mode with the per-epoch curves first,
and the Prefect flow-run page shows the training report and the per-epoch log lines."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlflow

from .helpers import REPO, TINY_OVERRIDES, free_port, stop_groups, wait_http, write_params

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow

# Chromium on a machine with no internet: no background fetches, no sandbox (CI runs as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev dependencies")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def test_mlflow_and_prefect_pages_show_the_run(browser, tmp_path, shared_mnist, mlflow_server):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    work = tmp_path / "work"
    work.mkdir()
    write_params(work / "params.yaml", {
        **TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 2, "train.batch_size": 256,
        "register.min_score": 0.0, "paths.dvc_file": None, "register.model_name": "browser",
        "runtime.tracking.experiment": "browser"})
    server = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "prefect-server", "--port", str(port)], env=env,
                              cwd=work, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, timeout=120)
        out = subprocess.run([sys.executable, "-m", "flows", "--mirror", str(shared_mnist)], env={
            **env, "PYTHONPATH": str(REPO)}, cwd=work, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        run = mlflow.MlflowClient(mlflow_server).get_run(json.loads(out.stdout)["run_id"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})

        # MLflow: the link we print opens in model-training mode, the run named for what it is.
        page.goto(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                  "?workflowType=machine_learning")
        page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
        page.get_by_text("Model registry").first.wait_for(timeout=30_000)  # not the GenAI menu
        page.get_by_role("tab", name="Model metrics").click()
        page.get_by_text("val_loss", exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "mlflow-run.png"))
        charts = page.locator("body").inner_text()
        # The per-epoch section comes before the single-value summaries.
        assert charts.index("val_loss") < charts.index("test_accuracy"), charts[:2000]
        assert page.locator("canvas, svg.main-svg").count() > 0  # charts drawn, not just named

        # Prefect: the flow run page, its training report and the library's per-epoch log lines.
        flow_run_id = run.data.tags["prefect.flow_run_id"]
        page.goto(f"http://127.0.0.1:{port}/runs/flow-run/{flow_run_id}")
        page.get_by_text("epoch 1/2 train loss").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "prefect-logs.png"))
        page.get_by_text("Artifacts", exact=True).first.click()
        page.get_by_text("training-report").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "prefect-run.png"))
    finally:
        stop_groups([server])
    assert Path(tmp_path / "prefect-run.png").stat().st_size > 10_000
