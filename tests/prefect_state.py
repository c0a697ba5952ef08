"""Print, as four JSON lines, the flow runs, the `training-report` artifacts, each flow's log lines and the
`sweep-report` artifacts of the
Prefect server at
PREFECT_API_URL. Run as its own process (`python -m tests.prefect_state`) so its client settings are the
server's, not the test process's."""

import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId


def main() -> None:
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        runs = [{"flow": flows[r.flow_id], "pool": r.work_pool_name, "state": r.state.type.value,
                 "parent": bool(r.parent_task_run_id), "seconds": r.total_run_time.total_seconds(),
                 "start": r.start_time.timestamp() if r.start_time else None,
                 "end": r.end_time.timestamp() if r.end_time else None}
                for r in client.read_flow_runs()]
        artifacts = client.read_artifacts()
        reports = [a.data for a in artifacts if a.key == "training-report"]
        sweep_reports = [a.data for a in artifacts if a.key == "sweep-report"]
        logs: dict[str, list[str]] = {}
        for r in client.read_flow_runs():
            found = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))
            logs.setdefault(flows[r.flow_id], []).extend(entry.message for entry in found)
    print(json.dumps(runs))
    print(json.dumps(reports))
    print(json.dumps(logs))
    print(json.dumps(sweep_reports))


if __name__ == "__main__":
    main()
