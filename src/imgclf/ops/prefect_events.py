"""A move of `production` made by hand (`imgclf promote`, `promote --rollback`) told to the Prefect server: the
same `imgclf.model.promoted` event the pipeline's register task emits, so the "model promoted" automation
(`python -m flows.notify`) notifies for every move, not only the gate's.

Posted to Prefect's REST API (`POST /api/events`, the endpoint Prefect's own clients batch events to), with
the server's login (PREFECT_API_AUTH_STRING) and, when the server asks for one, its CSRF token. Not through
Prefect's client: the library imports no orchestrator (pyproject's import contract, which keeps it runnable
where only torch, torchvision and numpy are installed), and one POST is all this needs. The server is the one
PREFECT_API_URL names, in the environment or in the active Prefect profile (where `prefect config set` writes
it); with neither there is no server whose automations could listen, and nothing is sent.
"""

from __future__ import annotations

import base64
import datetime
import getpass
import json
import os
import tomllib
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional

from ..urls import redact

MODEL_PROMOTED = "imgclf.model.promoted"
TIMEOUT_S = 10.0


def _setting(name: str) -> Optional[str]:
    if os.environ.get(name):
        return os.environ[name]
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    try:
        profiles = tomllib.loads((home / "profiles.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    value = (profiles.get("profiles") or {}).get(active, {}).get(name)
    return str(value) if value else None


def api_url() -> Optional[str]:
    url = _setting("PREFECT_API_URL")
    return url.rstrip("/") if url else None


def _request(url: str, headers: dict[str, str], body: Optional[bytes] = None) -> bytes:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
        return resp.read()


def emit(api: str, event: str, resource: dict[str, str], payload: dict[str, Any]) -> str:
    """Send one event to the API at `api`; returns its id. Raises OSError (urllib's errors among them)."""
    headers = {"Content-Type": "application/json"}
    auth = _setting("PREFECT_API_AUTH_STRING")
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    body = [{"id": str(uuid.uuid4()), "occurred": datetime.datetime.now(datetime.UTC).isoformat(),
             "event": event, "resource": resource, "payload": payload}]
    data = json.dumps(body).encode()
    try:
        _request(f"{api}/events", headers, data)
    except urllib.error.HTTPError as e:
        if e.code != 403:
            raise
        client = str(uuid.uuid4())  # a server with CSRF protection wants a token for this client first
        token = json.loads(_request(f"{api}/csrf-token?client={client}", headers))["token"]
        _request(f"{api}/events", {**headers, "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client}, data)
    return body[0]["id"]


def model_promoted(record: dict[str, Any]) -> Optional[str]:
    """Tell the server that `promote_stage`'s move happened; a line saying what was sent, or None when no server
    is set or nothing moved. A server that can't be reached fails nothing: the alias has moved already."""
    api = api_url()
    if api is None or record.get("action") not in ("promote", "rollback"):
        return None
    model, version = record["model"], str(record["production"])
    resource = {"prefect.resource.id": f"imgclf.model.{model}", "imgclf.model": model, "imgclf.version": version,
                "imgclf.flow": ""}
    payload = {"model": model, "version": version, "run_id": record.get("run_id") or "",
               "reason": f"{record['action']} by {getpass.getuser()}, v{record['from']} before: {record['reason']}"}
    shown = redact(api)
    try:
        emit(api, MODEL_PROMOTED, resource, payload)
    except (OSError, ValueError, KeyError) as e:
        return f"warning: production moved, but the Prefect server at {shown} was not told ({e}): no notification"
    return f"{MODEL_PROMOTED} sent to {shown} (its automations notify)"
