"""The `compare-models` flow: train several variants concurrently (MLP and CNN by default), each its own
MLflow run under one parent run, then register the best through the usual gate."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger

from flows.pipeline import flow_run_tags, load_config
from imgclf.tracking.runs import run_context
from tasks import stages as stage_tasks

DEFAULT_VARIANTS = [{"model.kind": "mlp"}, {"model.kind": "cnn"}]


def _variant_overrides(base: dict, variant: dict, i: int) -> dict:
    own = f"compare/{i}"
    return {**base, **variant, "paths.models_dir": f"models/{own}", "paths.metrics_dir": f"metrics/{own}",
            "paths.reports_dir": f"reports/{own}"}


@flow(name="compare-models", result_serializer="json")
def compare_models(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                   variants: Optional[list[dict[str, Any]]] = None) -> dict:
    logger = get_run_logger()
    base = dict(overrides or {})
    variants = variants or DEFAULT_VARIANTS
    cfg = load_config(params_path, base)
    configs = [load_config(params_path, _variant_overrides(base, v, i)) for i, v in enumerate(variants)]
    stage_tasks.download(cfg)
    stage_tasks.prepare_cached(cfg)
    with run_context(cfg, run_name="compare-models", tags=flow_run_tags()) as parent:
        tags = flow_run_tags()
        trained = [stage_tasks.train.submit(c, tags, parent_run_id=parent.run_id) for c in configs]
        evaluated = [stage_tasks.evaluate.submit(c, tags, wait_for=[f]) for c, f in zip(configs, trained)]
        results = [f.result() for f in evaluated]
        best = max(range(len(results)), key=lambda i: results[i]["accuracy"])
        parent.log_metrics({f"variant{i}_test_accuracy": r["accuracy"] for i, r in enumerate(results)})
        parent.set_tags({"compare.best_variant": str(variants[best])})
    logger.info("best variant %s: test accuracy %.4f", variants[best], results[best]["accuracy"])
    registered = stage_tasks.register(configs[best], tags)
    return {"variants": variants, "accuracy": [r["accuracy"] for r in results], "best": best, "registry": registered}
