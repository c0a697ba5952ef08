"""sweep.space as Optuna suggestions, and the baseline trial (the params as they are)."""

from __future__ import annotations

import logging
from typing import Any

import optuna

from ..config import Config, Dimension

log = logging.getLogger("imgclf")


def suggest(trial: optuna.Trial, dims: list[Dimension]) -> dict[str, Any]:
    """One value per searched key (an enqueued trial gets its fixed values back)."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            out[d.key] = trial.suggest_categorical(d.key, list(d.values))
        elif d.kind == "int":
            out[d.key] = trial.suggest_int(d.key, *d.values)
        else:
            out[d.key] = trial.suggest_float(d.key, *d.values, log=d.kind == "log_uniform")
    return out


def current_value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def baseline(cfg: Config, dims: list[Dimension]) -> dict[str, Any]:
    """The searched keys' values in params (train resolved); a value outside its range is left to the sampler."""
    out: dict[str, Any] = {}
    for d in dims:
        value = current_value(cfg, d.key)
        inside = value in d.values if d.kind == "choice" else d.values[0] <= value <= d.values[1]
        if inside:
            out[d.key] = value
        else:
            log.warning("baseline trial: %s=%r is outside sweep.space; that key is sampled", d.key, value)
    return out

