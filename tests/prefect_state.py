"""The flow runs, the `training-report` artifacts, each flow's log lines and the `sweep-report` artifacts of the
Prefect server at a given API URL (with its auth string), read in the test's own process."""

from __future__ import annotations


def state(api_url: str, auth: str | None = None) -> tuple[list[dict], list[str], dict[str, list[str]], list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: api_url, **({PREFECT_API_AUTH_STRING: auth} if auth else {})}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        found = client.read_flow_runs()
        runs = [{"id": str(r.id), "flow": flows[r.flow_id], "pool": r.work_pool_name, "state": r.state.type.value,
                 "parent": bool(r.parent_task_run_id), "seconds": r.total_run_time.total_seconds(),
                 "start": r.start_time.timestamp() if r.start_time else None,
                 "end": r.end_time.timestamp() if r.end_time else None}
                for r in found]
        artifacts = client.read_artifacts()
        reports = [a.data for a in artifacts if a.key == "training-report"]
        sweep_reports = [a.data for a in artifacts if a.key == "sweep-report"]
        logs: dict[str, list[str]] = {}
        for r in found:
            entries = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
            logs.setdefault(flows[r.flow_id], []).extend(entry.message for entry in entries)
    return runs, reports, logs, sweep_reports
