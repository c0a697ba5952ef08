"""The `imgclf` command: one subcommand per stage, each taking --params and --set overrides.

Over 200 lines because it is one thin command per stage plus the servers, each a few lines
around the stage function; the shared wrapper (config, errors, output) is written once.
The whole pipeline under Prefect starts from the orchestration layer: `python -m flows`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from typing import Callable

import click

from .config import Config, ConfigError, load

EXIT_CONFIG = 2


class StageError(click.ClickException):
    """One-line failure of a stage: printed as `error: ...`, exit 1 (with -v, the traceback first)."""

    def __init__(self, message: str, verbose: bool = False):
        super().__init__(message)
        self.verbose = verbose

    def show(self, file=None) -> None:
        if self.verbose and self.__cause__ is not None:
            import traceback

            traceback.print_exception(self.__cause__, file=sys.stderr)
        click.echo(f"error: {self.format_message()}", err=True)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its own message for the project's errors, the type for anything else."""
    text = " ".join(str(exc).split())[:500]
    if isinstance(exc, (OSError, ValueError, RuntimeError, LookupError)) and text:
        return text
    where = "MLflow: " if type(exc).__module__.startswith("mlflow") else f"{type(exc).__name__}: "
    return where + (text or "no message") + " (rerun with -v for the traceback)"


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):  # one line per HTTP request drowns the stage's own log
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C does, so open MLflow runs end KILLED and temp files go."""
    import signal
    import threading

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _progress_bar(desc: str, unit: str = "it", unit_scale: bool = False):
    """A tqdm bar on a terminal; None elsewhere so logs stay plain lines."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bars: dict = {}

    def update(name, done, total):
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(total=total, desc=f"{desc} {name}".strip(), unit=unit,
                                    unit_scale=unit_scale, leave=False)
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return update


WRITES_OUTPUTS = {"download", "prepare", "train", "evaluate", "register"}


def _check_params_unchanged(params_path: str, overrides: tuple[str, ...], cfg: Config, stage: str) -> None:
    """A params file edited while a stage ran: `dvc repro` would record the edited values in dvc.lock for
    outputs made with the old ones (and `dvc status` then calls them up to date). Exit 1 instead."""
    try:
        same = load(params_path, list(overrides)) == cfg
    except ConfigError:
        same = False
    if not same:
        raise StageError(f"{params_path}: changed while {stage} ran; its outputs were made with the values read "
                         f"at its start, so they are not recorded as current: run {stage} again")


def stage_command(func: Callable) -> Callable:
    """Add --params/--set, load config once (exit 2 on a bad one), turn known errors into one line."""

    @click.option("--params", "params_path", default="params.yaml", show_default=True,
                  type=click.Path(dir_okay=False), help="Params file.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a param, e.g. --set train.lr=0.01 (repeatable).")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
    @functools.wraps(func)
    def wrapper(params_path: str, overrides: tuple[str, ...], verbose: bool, **kwargs):
        setup_logging(verbose)
        exit_on_sigterm()
        try:
            cfg = load(params_path, list(overrides))
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        try:
            # stdout carries only the stage's result; libraries that print go to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                result = func(cfg, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # one line, whatever broke; -v adds the chained traceback
            raise StageError(one_line(exc), verbose) from exc
        if func.__name__ in WRITES_OUTPUTS:
            _check_params_unchanged(params_path, overrides, cfg, func.__name__)
        if isinstance(result, list):  # plain lines, e.g. predict's table
            click.echo("\n".join(result))
        elif result is not None:
            click.echo(json.dumps(result, indent=2, sort_keys=True))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """imgclf: download, prepare, train, evaluate and register image classifiers."""


_wait = click.option("--wait", is_flag=True, help="Wait while another process writes this stage's outputs "
                                                 "(default: fail at once, naming it).")


@main.command()
@click.option("--mirror", "mirrors", multiple=True, metavar="URL|DIR",
              help="Mirror for the data set (http(s) URL or local folder), replaces data.mirrors; "
                   "also $IMGCLF_MIRROR. Repeatable.")
@_wait
@stage_command
def download(cfg: Config, mirrors: tuple[str, ...], wait: bool) -> dict:
    """Fetch an MNIST-family data set (mirrors, retries, checksums) or snapshot an ImageFolder into data/raw."""
    from .stages.download import download_stage

    return download_stage(cfg, list(mirrors), progress=_progress_bar("download", "B", True), wait=wait)


@main.command()
@_wait
@stage_command
def prepare(cfg: Config, wait: bool) -> dict:
    """Decode, split (stratified, seeded) and store normalization stats in data/processed."""
    from .stages.prepare import prepare_stage

    return prepare_stage(cfg, progress=_progress_bar("prepare"), wait=wait)


@main.command()
@click.option("--resume", is_flag=True, help="Continue from models/checkpoint.pt (same model, data and params).")
@_wait
@stage_command
def train(cfg: Config, resume: bool, wait: bool) -> dict:
    """Train the MLP or CNN with validation, early stopping and per-epoch checkpoints."""
    import time

    from .stages.train import train_stage

    timeout = cfg.orchestration.train_timeout_s
    return train_stage(cfg, resume=resume, on_batch=_progress_bar("train"), wait=wait,
                       deadline=time.monotonic() + timeout if timeout else None)


@main.command()
@_wait
@stage_command
def evaluate(cfg: Config, wait: bool) -> dict:
    """Score the best model on the test split: metrics, per-class table, pictures, TorchScript."""
    from .stages.evaluate import evaluate_stage

    return evaluate_stage(cfg, wait=wait)


@main.command()
@_wait
@stage_command
def register(cfg: Config, wait: bool) -> dict:
    """Register the evaluated model (alias challenger) and run the promotion gate."""
    from .stages.register import register_stage

    return register_stage(cfg, wait=wait)


@main.command()
@_wait
@stage_command
def sync(cfg: Config, wait: bool) -> dict:
    """Send metrics journaled during a tracking outage and close the runs they belong to."""
    from .stages.sync import sync_stage

    return sync_stage(cfg, wait=wait)


@main.command()
@click.option("--version", "version", default=None, help="Version to move the production alias to.")
@click.option("--rollback", is_flag=True, help="Move production back to the version that held it before.")
@click.option("--reason", default="", help="Why; recorded on the version.")
@stage_command
def promote(cfg: Config, version: str | None, rollback: bool, reason: str) -> dict:
    """Move the `production` alias by hand, or roll it back."""
    from .stages.register import promote_stage

    if bool(version) == rollback:
        raise click.UsageError("give exactly one of --version N or --rollback")
    return promote_stage(cfg, version, rollback, reason)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model-uri", default=None, help="Default: models:/<register.model_name>@production.")
@stage_command
def predict(cfg: Config, images: tuple[str, ...], model_uri: str | None) -> list[str]:
    """Classify image files with a registered model: file, class, probability and the model version per line."""
    from .stages.predict import predict_stage

    return [f"{r['file']}\t{r['class']}\t{r['probability']:.4f}\t{r['model']}"
            for r in predict_stage(cfg, list(images), model_uri)]


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; see README before exposing.")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Host header to accept (repeatable).")
@click.option("--auth", is_flag=True, help="MLflow basic-auth (admin password from $MLFLOW_AUTH_ADMIN_PASSWORD); "
                                           "required off loopback.")
@stage_command
def ui(cfg: Config, host: str, port: int, allowed_hosts: tuple[str, ...], auth: bool) -> None:
    """Start the MLflow UI/server over the pipeline's local store (tracking.store_dir), or over the team's
    PostgreSQL and object store when $MLFLOW_BACKEND_STORE_URI and $MLFLOW_ARTIFACTS_DESTINATION are set."""
    import os

    from .servers import mlflow_server_command, sync_admin_password
    from .tracking import redact

    cmd, env = mlflow_server_command(cfg.tracking.store_dir, host, port, list(allowed_hosts) or None, auth=auth)
    if auth and sync_admin_password(env):
        click.echo("MLflow admin: password changed to MLFLOW_AUTH_ADMIN_PASSWORD (the old one no longer works)", err=True)
    click.echo(f"MLflow UI on http://{host}:{port} (store {redact(env['MLFLOW_BACKEND_STORE_URI'])}"
               f"{', basic-auth' if auth else ''})", err=True)
    os.execve(cmd[0], cmd, env)


@main.command("prefect-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; see README before exposing.")
@click.option("--port", default=4200, show_default=True, type=int)
def prefect_server(host: str, port: int) -> None:
    """Start a Prefect server with CSRF protection on (and an auth string required off loopback)."""
    import os

    from .servers import prefect_server_command

    try:
        cmd, env = prefect_server_command(host, port)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    click.echo(f"Prefect server on http://{host}:{port} (CSRF protection on)", err=True)
    os.execve(cmd[0], cmd, env)


@main.group()
def stack() -> None:
    """A local team stack on loopback (PostgreSQL + SeaweedFS S3) for tests and demos; see README "Team setup"."""


_state_dir = click.option("--dir", "state_dir", default=".stack", show_default=True,
                          help="Where the stack's state (ports, generated credentials; mode 0600) is kept.")


@stack.command("up")
@_state_dir
@click.option("--dvc-remote/--no-dvc-remote", default=True, show_default=True,
              help="Make the stack's bucket this DVC repository's default remote (in .dvc/config.local).")
def stack_up(state_dir: str, dvc_remote: bool) -> None:
    """Start the stack (or keep the running one) and print its environment as `export` lines."""
    from . import stack as team
    from .versioning import in_dvc_repo, set_s3_remote

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
    from . import stack as team

    try:
        click.echo("\n".join(team.shell_lines(team.environment(team.load(state_dir)))))
    except Exception as exc:  # no stack, or a damaged state file
        raise StageError(one_line(exc)) from exc


@stack.command("down")
@_state_dir
def stack_down(state_dir: str) -> None:
    """Stop the stack and delete its data (and the DVC remote `stack` that `up` added)."""
    from . import stack as team
    from .versioning import in_dvc_repo, remove_remote

    try:
        stopped = team.down(state_dir)
        if in_dvc_repo():
            remove_remote("stack")
    except Exception as exc:
        raise StageError(one_line(exc)) from exc
    click.echo("stack stopped and removed" if stopped else f"no stack recorded in {state_dir}", err=True)


if __name__ == "__main__":
    main()
