"""The commands for services rather than stages: start the MLflow UI, a Prefect server, the team stack or a
worker in the background, wait for a URL, stop what was started (the records and readiness checks behind them
are imgclf.ops.background)."""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import urllib.parse
import urllib.request

import click

from ..config import Config
from ..console import StageError, one_line
from .wrapper import stage_command

_wait = click.option("--wait", "background", is_flag=True,
                     help="Start it in the background (output in .services/), return once it answers; "
                          "`imgclf stop` stops it.")
_timeout = click.option("--timeout", default=900, show_default=True, type=float,
                        help="With --wait: seconds to wait for the server to answer.")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; see docs/security.md before exposing.")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Host header to accept (repeatable).")
@click.option("--auth", is_flag=True, help="MLflow basic-auth (admin password from $MLFLOW_AUTH_ADMIN_PASSWORD); "
                                           "required off loopback.")
@_wait
@_timeout
@stage_command
def ui(cfg: Config, host: str, port: int, allowed_hosts: tuple[str, ...], auth: bool, background: bool,
       timeout: float) -> dict | None:
    """Start the MLflow UI/server over the pipeline's local store (paths.mlflow_dir), or over the team's
    PostgreSQL and object store when $MLFLOW_BACKEND_STORE_URI and $MLFLOW_ARTIFACTS_DESTINATION are set."""
    import os

    from ..ops.servers import mlflow_server_command
    from ..urls import redact

    try:
        cmd, env = mlflow_server_command(cfg.paths.mlflow_dir, host, port, list(allowed_hosts) or None, auth=auth)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    base = f"http://{host}:{port}"
    what = f"MLflow UI on {base} (store {redact(env['MLFLOW_BACKEND_STORE_URI'])}{', basic-auth' if auth else ''})"
    if background:
        result = run_in_background(f"mlflow-{port}", "mlflow", cmd, env, f"{base}/health", what, timeout)
        return {**result, **experiment_links(base, cfg, env)}
    click.echo(f"{what}; open {experiment_links(base, cfg, env)['runs']}", err=True)
    os.execve(cmd[0], cmd, env)


@click.command()
@click.option("--model-uri", default=None, help="Default: models:/<register.model_name>@production, followed as it "
                                                "moves. A version, a run or a folder is served as it is.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; off loopback $IMGCLF_SERVE_TOKEN (a bearer token) is required.")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--shadow", "shadow", default=None, metavar="ALIAS|URI",
              help="Also score every request on this model, off the response path, and record the agreement in an "
                   "MLflow run of kind shadow: an alias of the same model (challenger) or any model URI.")
@_wait
@_timeout
@stage_command
def serve(cfg: Config, model_uri: str | None, host: str, port: int, shadow: str | None, background: bool,
          timeout: float) -> dict | None:
    """Serve the model online: POST /predict (an image file, or multipart files), POST /invocations (tensors, as
    `mlflow models serve` takes them), GET /livez, /readyz, /metrics. Requests are batched; the model follows
    its alias (serve.poll_s) and is swapped without dropping a request."""
    from ..ops.servers import is_loopback
    from ..serve.app import TOKEN_ENV
    from ..tracking.store import tracking_uri

    token = os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and (not token or len(token) < 16):
        raise StageError(f"--host {host}: off loopback the service needs ${TOKEN_ENV}, a bearer token of at least "
                         "16 characters (clients send `Authorization: Bearer <token>`)")
    uri = model_uri or f"models:/{cfg.model_name}@production"
    if shadow and re.fullmatch(r"[\w.-]+", shadow):  # an alias, of the model served
        from ..serve.following import registered_name

        shadow = f"models:/{registered_name(uri) or cfg.model_name}@{shadow}"
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if background:
        argv = [a for a in sys.argv[1:] if a != "--wait"]  # this very command, in the foreground, detached
        return run_in_background(f"serve-{port}", "serve", [sys.executable, "-m", "imgclf.cli", *argv],
                                 dict(os.environ), f"{base}/readyz", f"imgclf serve on {base} ({uri})", timeout)
    import uvicorn

    from ..serve.app import create_app

    app = create_app(cfg, uri, tracking_uri(cfg.tracking), token, shadow_uri=shadow)
    server = app.state.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                              timeout_graceful_shutdown=10))
    _say(f"imgclf serve on {base}: {uri}{f', shadow {shadow}' if shadow else ''}; /readyz answers 200 once it is loaded")
    server.run()
    if app.state.load_error:
        raise StageError(f"{uri}: {app.state.load_error}")
    return None


@click.command("prefect-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; see docs/security.md before exposing.")
@click.option("--port", default=4200, show_default=True, type=int)
@_wait
@_timeout
def prefect_server(host: str, port: int, background: bool, timeout: float) -> None:
    """Start a Prefect server with CSRF protection on (and an auth string required off loopback)."""
    import json
    import os

    from ..ops.servers import prefect_server_command

    try:
        cmd, env = prefect_server_command(host, port)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    what = f"Prefect server on http://{host}:{port} (CSRF protection on)"
    if background:
        try:
            result = run_in_background(f"prefect-{port}", "prefect", cmd, env, f"http://{host}:{port}/api/health",
                                       what, timeout)
        except Exception as exc:
            raise StageError(one_line(exc)) from None
        click.echo(json.dumps({**result, "api": f"http://{host}:{port}/api"}, indent=2))
        return
    click.echo(what, err=True)
    os.execve(cmd[0], cmd, env)


@click.group()
def stack() -> None:
    """A local team stack on loopback (PostgreSQL + SeaweedFS S3) for tests and demos; see docs/team.md."""


_state_dir = click.option("--dir", "state_dir", default=".stack", show_default=True,
                          help="Where the stack's state (ports, generated credentials; mode 0600) is kept.")


@stack.command("up")
@_state_dir
@click.option("--dvc-remote/--no-dvc-remote", default=True, show_default=True,
              help="Make the stack's bucket this DVC repository's default remote (in .dvc/config.local).")
def stack_up(state_dir: str, dvc_remote: bool) -> None:
    """Start the stack (or keep the running one) and print its environment as `export` lines."""
    from ..ops import stack as team
    from ..ops.versioning import in_dvc_repo, set_s3_remote

    try:
        env = team.environment(team.up(state_dir))
        if dvc_remote and in_dvc_repo():
            set_s3_remote("stack", env["IMGCLF_DVC_REMOTE_URL"], env["MLFLOW_S3_ENDPOINT_URL"],
                          env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])
    except Exception as exc:
        raise StageError(one_line(exc)) from exc
    click.echo("\n".join(team.shell_lines(env)))
    click.echo("stack up; `eval \"$(imgclf stack env)\"` sets these in a shell, `imgclf stack down` stops it",
               err=True)


@stack.command("env")
@_state_dir
def stack_env(state_dir: str) -> None:
    """Print the running stack's environment as `export` lines (for eval)."""
    from ..ops import stack as team

    try:
        click.echo("\n".join(team.shell_lines(team.environment(team.load(state_dir)))))
    except Exception as exc:  # no stack, or a damaged state file
        raise StageError(one_line(exc)) from exc


@stack.command("down")
@_state_dir
def stack_down(state_dir: str) -> None:
    """Stop the workers and servers started with `imgclf worker`/`--wait`, then the stack, and delete its data
    (and the DVC remote `stack` that `up` added)."""
    from ..ops import stack as team
    from ..ops.background import stop_all
    from ..ops.versioning import in_dvc_repo, remove_remote

    try:
        stop_all(say=lambda line: click.echo(line, err=True))  # the workers and servers first: they use the stack
        stopped = team.down(state_dir)
        if in_dvc_repo():
            remove_remote("stack")
    except Exception as exc:
        raise StageError(one_line(exc)) from exc
    click.echo("stack stopped and removed" if stopped else f"no stack recorded in {state_dir}", err=True)


def _say(line: str) -> None:
    click.echo(line, err=True)


def run_in_background(name: str, kind: str, cmd: list[str], env: dict[str, str], url: str, what: str,
                      timeout: float) -> dict:
    """Start a server detached (or find the one already running) and return once `url` answers."""
    from ..ops import background

    svc, new = background.start(name, kind, cmd, env, url=url)
    _say(f"{what}: {'starting' if new else 'already running'} (pid {svc.pid}, log {svc.log})")
    background.wait_until(lambda: background.answers(url), what, timeout, _say, svc)
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
    from ..ops import background
    from ..ops.servers import TELEMETRY_OFF

    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool] + (["--limit", str(limit)] if limit else [])
    # Its flow runs beat every 30 s (Prefect's least; its default 180): a pipeline whose train worker dies then
    # resubmits the training after 90 s (runtime.orchestration.train_lost_after_s), not after six minutes.
    beat = {} if {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"} & set(os.environ) else \
        {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    try:
        svc, new = background.start(f"worker-{pool}", "worker", cmd, {**os.environ, **TELEMETRY_OFF, **beat})
        _say(f"Prefect worker for pool {pool!r}: {'starting' if new else 'already running'} (pid {svc.pid}, "
             f"log {svc.log})")
        background.wait_until(lambda: "started!" in background.log_tail(svc, 200), f"the {pool!r} worker", timeout,
                            _say, svc)
    except Exception as exc:
        raise StageError(one_line(exc)) from None
    _say(f"Prefect worker for pool {pool!r}: polling")


@click.command()
@click.argument("url")
@click.option("--timeout", default=900, show_default=True, type=float)
def wait(url: str, timeout: float) -> None:
    """Return once URL answers (any HTTP status below 500), with a line every 10 s; exit 1 after --timeout."""
    from ..ops import background
    from ..urls import redact

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise click.BadParameter(f"{redact(url)[:200]!r}: an http(s) URL is needed", param_hint="URL")
    try:
        background.wait_until(lambda: background.answers(url), redact(url), timeout, _say)
    except TimeoutError as exc:
        raise StageError(str(exc)) from None


@click.command()
def stop() -> None:
    """Stop what `imgclf worker`, `ui --wait` and `prefect-server --wait` started here: workers, then servers."""
    from ..ops import background

    try:
        n = background.stop_all(say=_say)
    except Exception as exc:
        raise StageError(one_line(exc)) from None
    _say(f"{n} background process(es) stopped" if n else "nothing running from .services/")
