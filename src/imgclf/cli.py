"""The `imgclf` command: one subcommand per stage, each taking --params and --set overrides."""

from __future__ import annotations

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
        try:
            cfg = load(params_path, list(overrides))
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        try:
            result = func(cfg, **kwargs)
        except ConfigError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except (OSError, ValueError, RuntimeError) as exc:
            raise StageError(str(exc)) from exc
        if result is not None:
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


if __name__ == "__main__":
    main()
