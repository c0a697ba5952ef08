"""Both UIs in a real browser (headless Chromium from the system packages, driven by Playwright; the `browser`
fixture is in conftest.py) after a finished tiny pipeline: the MLflow run page opens in model-training mode
with the per-epoch curves first, the experiment's Models tab lists the logged model with its test metrics and
its registered version, the registered version's page shows the model card readably, and the
Prefect flow-run page shows the training report and the per-epoch log lines (check_pages, run on the guide's
server block's deployed stack by tests/test_readme.py); DVC's plots page draws offline."""

import os
import shutil
from pathlib import Path

import pytest

import mlflow

from .test_dvc import dvc, make_project

pytestmark = pytest.mark.slow


def check_pages(browser, mlflow_url: str, prefect_url: str, run, shots: Path, epochs: int,
                training_flow_run: str | None = None, prefect_auth: str | None = None) -> None:
    """The MLflow and Prefect pages of a finished pipeline run (`run`: its MLflow run), as a person opens them;
    screenshots into `shots`. `training_flow_run`: the flow run whose log holds the epochs (a deployed
    pipeline's child `train` run; by default the pipeline's own); `prefect_auth`: the server's auth string, sent
    as the Authorization header a proxy or the UI's login would add. tests/test_readme.py calls it on the guide's
    server block's live stack."""
    from imgclf.tracking.store import experiment_models_route
    from imgclf.tracking.ui_view import experiment_route

    page = browser.new_page(viewport={"width": 1600, "height": 1800})
    # The experiment's charts, as `imgclf ui` links them: loss (train and validation in one chart), accuracy,
    # learning rate, throughput, then the test split; in the model-training view.
    page.goto(mlflow_url + experiment_route(run.info.experiment_id, charts=True))
    page.get_by_text("Training curves (per epoch)").first.wait_for(timeout=60_000)
    page.get_by_text("epoch/images_per_s").first.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(shots / "mlflow-charts.png"))
    text = page.locator("body").inner_text()
    order = [text.index(k) for k in ("Training curves", "epoch/train_loss", "epoch/val_loss", "epoch/train_acc",
                                     "epoch/lr", "epoch/images_per_s", "Test split")]
    assert order == sorted(order), text[:3000]
    assert "Model registry" in text  # the model-training menu, not GenAI's

    # The runs list has the test metrics among its columns.
    page.goto(mlflow_url + experiment_route(run.info.experiment_id))
    page.get_by_text("test_accuracy").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "mlflow-runs.png"))

    # The run's Overview: the summary table, its Source (git commit) and the prepared data as datasets.
    page.goto(f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
              "?workflowType=machine_learning")
    page.get_by_text("mnist-train").first.wait_for(timeout=60_000)
    page.get_by_text("weights kept").first.wait_for(timeout=30_000)
    page.screenshot(path=str(shots / "mlflow-overview.png"), full_page=True)
    overview = page.locator("body").inner_text()
    assert run.data.tags["mlflow.source.git.commit"][:7] in overview, overview[:3000]
    contexts = {i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"]
                for i in mlflow.MlflowClient(mlflow_url).get_run(run.info.run_id).inputs.dataset_inputs}
    assert contexts == {"mnist-train": "training", "mnist-val": "validation", "mnist-test": "testing"}, contexts

    version = mlflow.MlflowClient(mlflow_url).search_model_versions(f"run_id = '{run.info.run_id}'")[0]
    # The experiment's Models tab (MLflow 3's logged models): each with its test metrics, measured on the test
    # split's dataset, and the registered version it became. Wide: the grid draws only the columns in view.
    wide = browser.new_page(viewport={"width": 3600, "height": 1000})
    wide.goto(mlflow_url + experiment_models_route(run.info.experiment_id))
    wide.get_by_text("test_accuracy").first.wait_for(timeout=60_000)
    wide.screenshot(path=str(shots / "mlflow-models.png"))
    models = wide.locator("body").inner_text()
    wide.close()
    accuracy = mlflow.MlflowClient(mlflow_url).get_run(run.info.run_id).data.metrics["test_accuracy"]
    for expected in ("test_macro_f1", "test_ece", "mnist-test (#", f"v{version.version}", str(accuracy)):
        assert expected in models, (expected, models[:3000])

    # MLflow: the link we print opens in model-training mode, the run named for what it is.
    page.goto(f"{mlflow_url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
              "?workflowType=machine_learning")
    page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
    page.get_by_text("Model registry").first.wait_for(timeout=30_000)  # not the GenAI menu
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_text("val_loss", exact=True).first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "mlflow-run.png"))
    charts = page.locator("body").inner_text()
    # The per-epoch section comes before the single-value summaries.
    assert charts.index("val_loss") < charts.index("test_accuracy"), charts[:2000]
    assert page.locator("canvas, svg.main-svg").count() > 0  # charts drawn, not just named

    # The registered version's page opens with the model card as a card: its title the page's heading and its
    # YAML header a code block at the end (as front matter, `---` made a heading of it and its keys bullets).
    page.goto(f"{mlflow_url}/#/models/{version.name}/versions/{version.version}")
    page.get_by_text("Card metadata").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "mlflow-version.png"), full_page=True)
    assert page.locator("h1").first.inner_text().startswith(f"{version.name}: ")
    assert "library_name: pytorch" in page.locator("pre").first.inner_text()
    stray = [t for t in page.locator("li, h1, h2").all_inner_texts() if t.startswith(("library_name", "- type", "value:"))]
    assert not stray, stray

    # Prefect: the flow run page with the library's per-epoch log lines, the pipeline's training report.
    flow_run_id = run.data.tags["prefect.flow_run_id"]
    if prefect_auth:
        import base64

        page = browser.new_context(viewport={"width": 1600, "height": 1800}, extra_http_headers={
            "Authorization": "Basic " + base64.b64encode(prefect_auth.encode()).decode()}).new_page()
    page.goto(f"{prefect_url}/runs/flow-run/{training_flow_run or flow_run_id}")
    try:
        page.get_by_text(f"epoch 1/{epochs} train loss").first.wait_for(timeout=60_000)
    except Exception:
        page.screenshot(path=str(shots / "prefect-failed.png"))
        raise
    page.screenshot(path=str(shots / "prefect-logs.png"))
    page.goto(f"{prefect_url}/runs/flow-run/{flow_run_id}")
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("training-report").first.wait_for(timeout=60_000)
    page.screenshot(path=str(shots / "prefect-run.png"))
    assert Path(shots / "prefect-run.png").stat().st_size > 10_000
    keep_screenshots(shots)


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
    # loss, accuracy and the confusion matrix, each once (a stage-level plot of the history drew val_loss again)
    assert page.locator(".vega-embed").count() == 3, html.count("vega-embed")
    keep_screenshots(tmp_path)
