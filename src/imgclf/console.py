"""The terminal side of every command: one-line errors, exit codes, logging setup, Ctrl-C and SIGTERM, progress bars.

Shared by the `imgclf` CLI and `python -m flows`, so the orchestration layer imports no CLI internals.
"""

from __future__ import annotations

import logging
import sys

import click

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


FOREIGN_LIMIT = 500  # a library's message can be a whole page (an HTML error body, a repr of an array)


def one_line(exc: BaseException) -> str:
    """An exception as one line: its own message for the project's errors, the type for anything else. The
    project's messages stay whole (they end with what to do about it); another's over FOREIGN_LIMIT characters
    keeps its start and its end, the cut marked."""
    text = " ".join(str(exc).split())
    if len(text) > FOREIGN_LIMIT and not type(exc).__module__.startswith("imgclf."):
        head, tail = FOREIGN_LIMIT - 180, 160
        text = f"{text[:head]} [... {len(text) - head - tail} characters ...] {text[-tail:]}"
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
    quiet_libraries()


def quiet_libraries() -> None:
    """MLflow's chatter in every evaluate, which buries our lines: its uv-project detection and pip-version notes
    (we pin the model's requirements ourselves), deprecation notices about its own internals, artifact progress
    bars (flattened into one long line in worker logs), and its telemetry. A setting the user made wins."""
    import os
    import warnings

    for key, value in {"MLFLOW_UV_AUTO_DETECT": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(key, value)
    for name in ("mlflow.utils.environment", "mlflow.utils.uv_utils", "mlflow.utils.requirements_utils",
                 "mlflow.models.model", "mlflow.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(mlflow|starlette|pydantic)(\.|$)")


_caught: list[int] = []  # every Ctrl-C or SIGTERM a stage received, whether its exception survived or not


def exit_on_signals() -> None:
    """Ctrl-C and SIGTERM unwind the stage, so open MLflow runs end KILLED and temp files go.

    Each is also remembered: a signal that lands while a weakref callback or a __del__ runs (garbage collection
    can start anywhere) raises there, and Python only prints that exception and drops it. The stage would then
    go on and report success; `raise_if_interrupted` at its end raises it again."""
    import signal
    import threading

    def handler(signum, frame):
        _caught.append(signum)
        _raise(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a caller ignores Ctrl-C
            signal.signal(signal.SIGINT, handler)


def raise_if_interrupted() -> None:
    """Raise the interrupt this process received, if its own exception was dropped (see `exit_on_signals`)."""
    if _caught:
        _raise(_caught[-1])


def _raise(signum: int) -> None:
    import signal

    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def progress_bar(desc: str, unit: str = "it", unit_scale: bool = False):
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
