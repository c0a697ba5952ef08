"""What every stage command shares: --params/--set/-v, the config loaded once, errors as one line, output.

Exit codes: 2 for a bad params file or override (before any work), 1 for a stage that failed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
from typing import Callable

import click

from ..config import Config, ConfigError, load, parse_override
from ..config.params_file import read_params
from ..console import EXIT_CONFIG, StageError, exit_on_signals, one_line, raise_if_interrupted, setup_logging

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


EXIT_CODE = "_exit_code"  # a command's result may carry the exit status it ends with, after its output
EXIT_DRIFT = 3  # predict-batch --fail-on-drift: the batch drifted (everything was still written)


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
        exit_on_signals()
        try:
            cfg = load(params_path, list(overrides))
            if "source" in inspect.signature(func).parameters:  # the params as written (a sweep builds its trials')
                kwargs["source"] = (read_params(params_path), dict(parse_override(o) for o in overrides))
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        try:
            # stdout carries only the stage's result; libraries that print go to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                result = func(cfg, **kwargs)
            raise_if_interrupted()
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # one line, whatever broke; -v adds the chained traceback
            raise StageError(one_line(exc), verbose) from exc
        if func.__name__ in WRITES_OUTPUTS:
            _check_params_unchanged(params_path, overrides, cfg, func.__name__)
        code = result.pop(EXIT_CODE, 0) if isinstance(result, dict) else 0
        if isinstance(result, list):  # plain lines, e.g. predict's table
            click.echo("\n".join(result))
        elif result is not None:
            click.echo(json.dumps(result, indent=2, sort_keys=True))
        if code:
            sys.exit(code)

    return wrapper
