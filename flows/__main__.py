"""`python -m flows`: the whole training-pipeline flow in this process, on Prefect's local API (no server).

The orchestration entry point lives here, beside the flows, so the `imgclf` library never imports Prefect.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import click

from imgclf.config import ConfigError, load, parse_override
from imgclf.console import EXIT_CONFIG, StageError, exit_on_signals, raise_if_interrupted, setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a param (repeatable).")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL|DIR", help="MNIST mirror (repeatable).")
@click.option("-v", "--verbose", is_flag=True)
def run(params_path: str, overrides: tuple[str, ...], mirrors: tuple[str, ...], verbose: bool) -> None:
    """Run the whole training-pipeline Prefect flow in this process (Prefect's local API, no server)."""
    setup_logging(verbose)
    exit_on_signals()
    try:
        parsed = dict(parse_override(o) for o in overrides)
        load(params_path, parsed)  # exit 2 before Prefect starts
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    from flows.local_api import prepare_local_api
    from flows.pipeline import training_pipeline

    prepare_local_api()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result (MLflow prints links)
        state = training_pipeline(params_path, parsed, list(mirrors) or None, return_state=True)
    raise_if_interrupted()
    if not state.is_completed():
        raise StageError(f"training-pipeline ended {state.name}: {state.message}")
    result = state.result()
    wall = time.perf_counter() - start
    work = sum(result["stage_seconds"].values())
    result["timing"] = {"wall_seconds": round(wall, 2), "stage_seconds": round(work, 2),
                        "orchestration_seconds": round(wall - work, 2),
                        "orchestration_share": round((wall - work) / wall, 4)}
    click.echo(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    run()
