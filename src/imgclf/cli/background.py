"""Commands for a shell session's background processes: `imgclf worker`, `imgclf wait URL`, `imgclf stop`, and the
start-and-wait that `ui --wait` and `prefect-server --wait` share (ops/services.py keeps their records)."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.parse
import urllib.request

import click

from ..config import Config
from ..console import StageError, one_line


def _say(line: str) -> None:
    click.echo(line, err=True)


def run_in_background(name: str, kind: str, cmd: list[str], env: dict[str, str], url: str, what: str,
                      timeout: float) -> dict:
    """Start a server detached (or find the one already running) and return once `url` answers."""
    from ..ops import services

    svc, new = services.start(name, kind, cmd, env, url=url)
    _say(f"{what}: {'starting' if new else 'already running'} (pid {svc.pid}, log {svc.log})")
    services.wait_until(lambda: services.answers(url), what, timeout, _say, svc)
    _say(f"{what}: ready")
    return {"pid": svc.pid, "log": svc.log}


def _api(base: str, method: str, path: str, body: dict | None = None, env: dict | None = None) -> dict:
    env = env or os.environ
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


def experiment_links(base: str, cfg: Config, env: dict[str, str]) -> dict:
    """The experiment's runs list and charts in the model-training view, with our saved view on the experiment;
    the experiments list while the pipeline has made none (or the server cannot be asked yet)."""
    from ..tracking.mlflow_internals import embedded_experiment_id
    from ..tracking.ui_view import ML_VIEW, VIEW_TAG, experiment_route, view_state

    name = cfg.tracking.experiment
    try:
        exp = _api(base, "GET", "/api/2.0/mlflow/experiments/get-by-name?experiment_name="
                   + urllib.parse.quote(name), env=env)["experiment"]
        if {t["key"]: t["value"] for t in exp.get("tags", [])}.get(VIEW_TAG) != view_state():
            _api(base, "POST", "/api/2.0/mlflow/experiments/set-experiment-tag",
                 {"experiment_id": exp["experiment_id"], "key": VIEW_TAG, "value": view_state()}, env)
    except Exception:  # not made yet, or not up yet (the foreground start prints before it binds)
        eid = embedded_experiment_id(env.get("MLFLOW_BACKEND_STORE_URI", ""), name)
        if eid is None:
            return {"url": base, "runs": f"{base}/#/experiments?{ML_VIEW}"}
    else:
        eid = exp["experiment_id"]
    return {"url": base, "runs": base + experiment_route(eid), "charts": base + experiment_route(eid, charts=True)}


@click.command()
@click.option("--pool", required=True, help="The Prefect work pool to poll (created as a process pool if missing).")
@click.option("--limit", type=int, help="Flow runs at once (one training per GPU: 1).")
@click.option("--timeout", default=300, show_default=True, type=float, help="Seconds to wait for it to start.")
def worker(pool: str, limit: int | None, timeout: float) -> None:
    """Start a Prefect worker for POOL in the background (output in .services/worker-POOL.log) with this shell's
    environment (PREFECT_API_URL, MLFLOW_TRACKING_URI, ...); return once it polls. `imgclf stop` stops it."""
    from ..ops import services
    from ..ops.servers import TELEMETRY_OFF

    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool] + (["--limit", str(limit)] if limit else [])
    try:
        svc, new = services.start(f"worker-{pool}", "worker", cmd, {**os.environ, **TELEMETRY_OFF})
        _say(f"Prefect worker for pool {pool!r}: {'starting' if new else 'already running'} (pid {svc.pid}, "
             f"log {svc.log})")
        services.wait_until(lambda: "started!" in services.log_tail(svc, 200), f"the {pool!r} worker", timeout,
                            _say, svc)
    except Exception as exc:
        raise StageError(one_line(exc)) from None
    _say(f"Prefect worker for pool {pool!r}: polling")


@click.command()
@click.argument("url")
@click.option("--timeout", default=900, show_default=True, type=float)
def wait(url: str, timeout: float) -> None:
    """Return once URL answers (any HTTP status below 500), with a line every 10 s; exit 1 after --timeout."""
    from ..ops import services

    try:
        services.wait_until(lambda: services.answers(url), url, timeout, _say)
    except TimeoutError as exc:
        raise StageError(str(exc)) from None


@click.command()
def stop() -> None:
    """Stop what `imgclf worker`, `ui --wait` and `prefect-server --wait` started here: workers, then servers."""
    from ..ops import services

    try:
        n = services.stop_all(say=_say)
    except Exception as exc:
        raise StageError(one_line(exc)) from None
    _say(f"{n} background process(es) stopped" if n else "nothing running from .services/")
