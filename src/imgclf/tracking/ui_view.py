"""How the experiment opens in the MLflow UI: a view state saved on the experiment (MLflow's shared views: the tag
`mlflow.sharedViewState.<key>`, opened by `?viewStateShareKey=<key>`), so the first page a person sees has the
columns and charts that matter, in that order, in the model-training view, on any browser.

MLflow draws one metric per chart on a run's own page and orders them by name; the experiment's chart view
takes a saved layout, so that is where train and validation loss share one chart."""

from __future__ import annotations

import json

VIEW_KEY = "imgclf-v1"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
ML_VIEW = "workflowType=machine_learning"

# (chart title, metrics drawn together), per epoch then the test split's single values.
CURVES = (("loss: train and validation", ("epoch/train_loss", "epoch/val_loss")),
          ("accuracy: train and validation", ("epoch/train_acc", "epoch/val_acc")),
          ("learning rate", ("epoch/lr",)),
          ("throughput (images/s)", ("epoch/images_per_s",)))
TEST = ("test_accuracy", "test_macro_f1", "test_ece", "test_loss")
COLUMNS = ("test_accuracy", "test_macro_f1", "test_ece", "kept_epoch", "train_seconds")


def _line(i: int, title: str, keys: tuple[str, ...]) -> dict:
    return {"uuid": f"imgclf-curve-{i}", "type": "LINE", "runsCountToCompare": 10, "metricSectionId": "imgclf-curves",
            "deleted": False, "isGenerated": False, "displayName": title, "metricKey": keys[0],
            "selectedMetricKeys": list(keys), "lineSmoothness": 0, "xAxisScaleType": "linear", "scaleType": "linear",
            "xAxisKey": "step", "selectedXAxisMetricKey": "", "yAxisKey": "metric", "yAxisExpressions": [],
            "ignoreOutliers": False, "useGlobalXaxisKey": False, "useGlobalLineSmoothing": False, "range": {}}


def _bar(key: str) -> dict:
    return {"uuid": f"imgclf-{key}", "type": "BAR", "runsCountToCompare": 10, "metricSectionId": "imgclf-test",
            "deleted": False, "isGenerated": False, "displayName": key, "metricKey": key}


def view_state() -> str:
    return json.dumps({
        "selectedColumns": [f"metrics.`{k}`" for k in COLUMNS],
        "compareRunSections": [
            {"uuid": "imgclf-curves", "name": "Training curves (per epoch)", "display": True, "isReordered": False},
            {"uuid": "imgclf-test", "name": "Test split", "display": True, "isReordered": False}],
        "compareRunCharts": [_line(i, t, k) for i, (t, k) in enumerate(CURVES)] + [_bar(k) for k in TEST],
        "isAccordionReordered": True}, sort_keys=True)


def experiment_route(experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs (with test accuracy among the columns) or its charts, in the model-training view."""
    mode = "&compareRunsMode=CHART" if charts else ""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}{mode}&{ML_VIEW}"
