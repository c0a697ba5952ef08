"""The `imgclf` command: one subcommand per stage, each taking --params and --set overrides."""

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
    """One-line failure of a stage: printed as `error: ...`, exit 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "httpcore"):  # one line per HTTP request drowns the stage's own log
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _exit_on_sigterm() -> None:
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


def stage_command(func: Callable) -> Callable:
    """Add --params/--set, load config once (exit 2 on a bad one), turn known errors into one line."""

    @click.option("--params", "params_path", default="params.yaml", show_default=True,
                  type=click.Path(dir_okay=False), help="Params file.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a param, e.g. --set train.lr=0.01 (repeatable).")
    @click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
    @functools.wraps(func)
    def wrapper(params_path: str, overrides: tuple[str, ...], verbose: bool, **kwargs):
        _setup_logging(verbose)
        _exit_on_sigterm()
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
        except (OSError, ValueError, RuntimeError, LookupError) as exc:
            raise StageError(str(exc)) from exc
        except Exception as exc:
            if type(exc).__module__.startswith("mlflow"):  # e.g. the server went away mid-stage
                raise StageError(f"MLflow: {str(exc).splitlines()[0]}") from exc
            raise
        if isinstance(result, list):  # plain lines, e.g. predict's table
            click.echo("\n".join(result))
        elif result is not None:
            click.echo(json.dumps(result, indent=2, sort_keys=True))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """imgclf: download, prepare, train, evaluate and register image classifiers."""


@main.command()
@click.option("--mirror", "mirrors", multiple=True, metavar="URL|DIR",
              help="MNIST mirror (http(s) URL or local folder), replaces data.mirrors; "
                   "also $IMGCLF_MIRROR. Repeatable.")
@stage_command
def download(cfg: Config, mirrors: tuple[str, ...]) -> dict:
    """Fetch MNIST (mirrors, retries, MD5) or snapshot an ImageFolder into data/raw."""
    from .stages import download_stage

    return download_stage(cfg, list(mirrors), progress=_progress_bar("download", "B", True))


@main.command()
@stage_command
def prepare(cfg: Config) -> dict:
    """Decode, split (stratified, seeded) and store normalization stats in data/processed."""
    from .stages import prepare_stage

    bar = _progress_bar("decode")
    return prepare_stage(cfg, progress=(lambda n, total: bar("", n, total)) if bar else None)


@main.command()
@click.option("--resume", is_flag=True, help="Continue from models/checkpoint.pt (same model, data and params).")
@stage_command
def train(cfg: Config, resume: bool) -> dict:
    """Train the MLP or CNN with validation, early stopping and per-epoch checkpoints."""
    import time

    from .stages import train_stage

    bar = _progress_bar("train")
    on_batch = (lambda epoch, done, total: bar(f"epoch {epoch}", done, total)) if bar else None
    timeout = cfg.orchestration.train_timeout_s
    return train_stage(cfg, resume=resume, on_batch=on_batch,
                       deadline=time.monotonic() + timeout if timeout else None)


@main.command()
@stage_command
def evaluate(cfg: Config) -> dict:
    """Score the best model on the test split: metrics, per-class table, pictures, TorchScript."""
    from .stages import evaluate_stage

    return evaluate_stage(cfg)


@main.command()
@stage_command
def register(cfg: Config) -> dict:
    """Register the evaluated model (alias challenger) and run the promotion gate."""
    from .stages import register_stage

    return register_stage(cfg)


@main.command()
@click.option("--version", "version", default=None, help="Version to move the production alias to.")
@click.option("--rollback", is_flag=True, help="Move production back to the version that held it before.")
@click.option("--reason", default="", help="Why; recorded on the version.")
@stage_command
def promote(cfg: Config, version: str | None, rollback: bool, reason: str) -> dict:
    """Move the `production` alias by hand, or roll it back."""
    from .stages import promote_stage

    if bool(version) == rollback:
        raise click.UsageError("give exactly one of --version N or --rollback")
    return promote_stage(cfg, version, rollback, reason)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model-uri", default=None, help="Default: models:/<register.model_name>@production.")
@stage_command
def predict(cfg: Config, images: tuple[str, ...], model_uri: str | None) -> list[str]:
    """Classify image files with a registered model: file, class and probability per line."""
    from .stages import predict_stage

    return [f"{r['file']}\t{r['class']}\t{r['probability']:.4f}" for r in predict_stage(cfg, list(images), model_uri)]


@main.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a param (repeatable).")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL|DIR", help="MNIST mirror (repeatable).")
@click.option("-v", "--verbose", is_flag=True)
def run(params_path: str, overrides: tuple[str, ...], mirrors: tuple[str, ...], verbose: bool) -> None:
    """Run the whole training-pipeline Prefect flow in this process (Prefect's local API, no server)."""
    from .config import parse_override

    _setup_logging(verbose)
    _exit_on_sigterm()
    try:
        parsed = dict(parse_override(o) for o in overrides)
        load(params_path, parsed)  # exit 2 before Prefect starts
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    from flows.local_api import prepare_local_api  # the orchestration layer, outside the library
    from flows.pipeline import training_pipeline

    prepare_local_api()

    import time

    start = time.perf_counter()
    state = training_pipeline(params_path, parsed, list(mirrors) or None, return_state=True)
    if not state.is_completed():
        raise StageError(f"training-pipeline ended {state.name}: {state.message}")
    result = state.result()
    wall = time.perf_counter() - start
    work = sum(result["stage_seconds"].values())
    result["timing"] = {"wall_seconds": round(wall, 2), "stage_seconds": round(work, 2),
                        "orchestration_seconds": round(wall - work, 2),
                        "orchestration_share": round((wall - work) / wall, 4)}
    click.echo(json.dumps(result, indent=2, sort_keys=True))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind; see README before exposing.")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--allowed-host", "allowed_hosts", multiple=True, help="Host header to accept (repeatable).")
@stage_command
def ui(cfg: Config, host: str, port: int, allowed_hosts: tuple[str, ...]) -> None:
    """Start the MLflow UI/server over the pipeline's local store (tracking.store_dir)."""
    import os

    from .servers import mlflow_server_command

    cmd = mlflow_server_command(cfg.tracking.store_dir, host, port, list(allowed_hosts) or None)
    click.echo(f"MLflow UI on http://{host}:{port} (store {cfg.tracking.store_dir}/)", err=True)
    os.execv(cmd[0], cmd)


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


if __name__ == "__main__":
    main()
