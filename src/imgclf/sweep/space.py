"""sweep.space as Optuna suggestions, the baseline trial (the params as they are), and the best trial, checked.

The study database is a file (or a database) that others can write: a trial read back is used only if its
params are the space's keys within their ranges and its value a finite number, whatever the database says.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

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



def outside(params: dict[str, Any], dims: list[Dimension]) -> Optional[str]:
    """Why `params` (a trial's, read back from the study) are not a point of the space; None when they are."""
    if set(params) != {d.key for d in dims}:
        return f"keys {sorted(params)} are not sweep.space's {sorted(d.key for d in dims)}"
    for d in dims:
        value = params[d.key]
        if d.kind == "choice":
            inside = any(value == v and type(value) is type(v) for v in d.values)
        else:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            inside = number and math.isfinite(value) and d.values[0] <= value <= d.values[1] and \
                (d.kind != "int" or float(value).is_integer())
        if not inside:
            return f"{d.key}={str(value)[:40]} is outside sweep.space"
    return None


def best_trial(study: optuna.Study, dims: list[Dimension], warn: bool = True) -> Optional[optuna.trial.FrozenTrial]:
    """The best finished trial whose params are a point of the space and whose value is finite; each one that
    is not is left out (and named in the log with `warn`)."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    good = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        why = outside(t.params, dims) or (None if isinstance(t.value, float) and math.isfinite(t.value)
                                          else f"value {str(t.value)[:40]} is not a finite number") \
            or (None if isinstance(t.user_attrs.get("mlflow_run_id"), str) else "no MLflow run of this sweep")
        if why:
            if warn:
                log.warning("sweep: trial %d left out (%s): the study was not written by this sweep", t.number,
                            why)
        else:
            good.append(t)
    if not good:
        return None
    pick = max if study.direction == StudyDirection.MAXIMIZE else min
    return pick(good, key=lambda t: t.value)
