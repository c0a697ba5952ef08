"""The `data-audit` flow: download → prepare → imgclf audit (suspected label errors and near-duplicate images of
the prepared splits), with its counts and top rows as a markdown report."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import flow_run_tags, load_config
from imgclf.audit.report import markdown, summary_line
from imgclf.files import read_json_file
from imgclf.layout import Layout
from tasks import stages as stage_tasks


@flow(name="data-audit", result_serializer="json")
def data_audit(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
               base_overrides: Optional[dict[str, Any]] = None, mirrors: Optional[list[str]] = None) -> dict:
    cfg = load_config(params_path, {**(base_overrides or {}), **(overrides or {})})
    stage_tasks.download(cfg, mirrors)
    stage_tasks.prepare_cached(cfg)
    record = stage_tasks.audit(cfg, flow_run_tags())
    full = read_json_file(Layout.of(cfg).audit / "audit.json")
    create_markdown_artifact(markdown(full) + f"\nEvery row: `{record['audit_dir']}`.", key="data-audit",
                             description="Suspected label errors and near-duplicate groups")
    get_run_logger().info("audit: %s", summary_line(full))
    return record
