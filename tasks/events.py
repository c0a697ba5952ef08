"""The Prefect events this project emits, what automations and deployment triggers listen for.

- imgclf.data.changed: the download stage saw the raw data's hash change (DVC's md5 of data/raw when
  DVC versions it, else a digest of the files). Labels: imgclf.source, imgclf.flow (the flow that
  downloaded: a `training-pipeline` run already trains on the new data, so deployment triggers listen
  to `data-refresh` only).
- imgclf.model.promoted: register moved `production` to a new version (`imgclf promote` sends it too, for a
  move by hand: imgclf.ops.prefect_events).
- imgclf.drift.detected: a batch-inference run found the batch drifted from the model's training data.
"""

from __future__ import annotations

from typing import Any, Optional

from imgclf.ops.prefect_events import MODEL_PROMOTED  # noqa: F401  (also sent by `imgclf promote`)

DATA_CHANGED = "imgclf.data.changed"
DRIFT_DETECTED = "imgclf.drift.detected"


def emit(event: str, resource_id: str, labels: Optional[dict[str, str]] = None,
         payload: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Emit within the current flow run (Prefect relates the event to it); returns the event id."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    resource = {"prefect.resource.id": resource_id, "imgclf.flow": str(flow_run.flow_name or ""),
                **(labels or {})}
    sent = emit_event(event, resource=resource, payload=payload or {})
    return str(sent.id) if sent is not None else None
