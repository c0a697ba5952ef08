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

from .helpers import REPO, TINY_OVERRIDES, free_port, require, stop_groups, wait_http, write_params
from .test_dvc import dvc, make_project

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow

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


def test_mlflow_and_prefect_pages_show_the_run(browser, tmp_path, shared_mnist, mlflow_server):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "MLFLOW_TRACKING_URI": mlflow_server, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    work = tmp_path / "work"
    work.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "remote", "add", "origin", "https://git.example.com/team/imgclf.git"]):
        subprocess.run(cmd, cwd=work, check=True)
    write_params(work / "params.yaml", {
        **TINY_OVERRIDES, "runtime.tracking.enabled": True, "train.max_epochs": 2, "train.batch_size": 256,
        "register.min_score": 0.0, "paths.dvc_file": None, "register.model_name": "browser",
        "runtime.tracking.experiment": "browser"})
    server = subprocess.Popen([sys.executable, "-m", "imgclf.cli", "prefect-server", "--port", str(port)], env=env,
                              cwd=work, stdout=open(tmp_path / "server.log", "wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"], cwd=work, check=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", server, timeout=120)
        out = subprocess.run([sys.executable, "-m", "flows", "--mirror", str(shared_mnist)], env={
            **env, "PYTHONPATH": str(REPO)}, cwd=work, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        run = mlflow.MlflowClient(mlflow_server).get_run(json.loads(out.stdout)["run_id"])
        page = browser.new_page(viewport={"width": 1600, "height": 1800})
        from imgclf.tracking.ui_view import experiment_route

        # The experiment's charts, as `imgclf ui` links them: loss (train and validation in one chart), accuracy,
        # learning rate, throughput, then the test split; in the model-training view.
        page.goto(mlflow_server + experiment_route(run.info.experiment_id, charts=True))
        page.get_by_text("Training curves (per epoch)").first.wait_for(timeout=60_000)
        page.get_by_text("epoch/images_per_s").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(tmp_path / "mlflow-charts.png"))
        text = page.locator("body").inner_text()
        order = [text.index(k) for k in ("Training curves", "epoch/train_loss", "epoch/val_loss", "epoch/train_acc",
                                         "epoch/lr", "epoch/images_per_s", "Test split")]
        assert order == sorted(order), text[:3000]
        assert "Model registry" in text  # the model-training menu, not GenAI's

        # The runs list has the test metrics among its columns.
        page.goto(mlflow_server + experiment_route(run.info.experiment_id))
        page.get_by_text("test_accuracy").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "mlflow-runs.png"))

        # The run's Overview: the summary table, its Source (git commit) and the prepared data as datasets.
        page.goto(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
                  "?workflowType=machine_learning")
        page.get_by_text("mnist-train").first.wait_for(timeout=60_000)
        page.get_by_text("weights kept").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "mlflow-overview.png"), full_page=True)
        overview = page.locator("body").inner_text()
        assert run.data.tags["mlflow.source.git.commit"][:7] in overview, overview[:3000]
        contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                    for i in mlflow.MlflowClient(mlflow_server).get_run(run.info.run_id).inputs.dataset_inputs}
        assert contexts == {"mnist-train": "training", "mnist-val": "validation", "mnist-test": "testing"}, contexts

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
    keep_screenshots(tmp_path)


def keep_screenshots(folder: Path) -> None:
    """Copied to $IMGCLF_SCREENSHOTS when set, for a person to look at."""
    target = os.environ.get("IMGCLF_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, Path(target) / png.name)


def test_dvc_plots_render_offline(browser, tmp_path, monkeypatch):
    """`dvc plots show` makes a page whose Vega plots draw with no network (the scripts are in the page)."""
    repo = make_project(tmp_path, monkeypatch)
    dvc("repro", cwd=repo)
    dvc("plots", "show", cwd=repo)
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in html and 'src="http' not in html
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    blocked = []
    page.route("http*://**", lambda route: (blocked.append(route.request.url), route.abort()))
    page.goto((repo / "dvc_plots" / "index.html").as_uri())
    page.wait_for_function("document.querySelectorAll('.vega-embed svg, .vega-embed canvas').length >= 3",
                           timeout=60_000)
    page.screenshot(path=str(tmp_path / "dvc-plots.png"), full_page=True)
    assert not blocked, blocked
    keep_screenshots(tmp_path)
