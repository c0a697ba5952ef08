"""This project's events (imgclf.*), every flow run (flow, deployment, state, times, parameters) and the
markdown artifacts (key: text) of the Prefect server at a given API URL, read in the test's own process:
the triggers test polls it every few seconds, and a new Python importing Prefect each time competed with
the training it waited for."""

from __future__ import annotations

import datetime


def snapshot(api_url: str, events: bool = True, artifacts: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """(events, runs, artifacts); `events=False` or `artifacts=False` skips that query (an empty list)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
        found = client.request("POST", "/events/filter", json={"filter": EventFilter(
            event=EventNameFilter(prefix=["imgclf."]), occurred=EventOccurredFilter(since=since)).model_dump(mode="json"),
            "limit": 50}).json() if events else {}
        events = [{"event": e["event"], "id": e["id"], "occurred": e["occurred"], "resource": e["resource"],
                   "payload": e["payload"]} for e in found.get("events", [])]
        flows = {f.id: f.name for f in client.read_flows()}
        deployments = {d.id: d.name for d in client.read_deployments()}
        runs = [{"flow": flows[r.flow_id], "deployment": deployments.get(r.deployment_id), "state": r.state.name,
                 "type": r.state.type.value, "message": r.state.message, "created": r.created.isoformat(),
                 "start": r.start_time.isoformat() if r.start_time else None,
                 "end": r.end_time.isoformat() if r.end_time else None, "parameters": r.parameters}
                for r in client.read_flow_runs()]
        artifacts = [{"key": a.key, "data": a.data} for a in client.read_artifacts() if a.key] if artifacts else []
    return events, runs, artifacts
