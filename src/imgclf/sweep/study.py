"""The Optuna study of a sweep: where it is stored, its sampler and pruner, its identity, and its trials'
bookkeeping (which count, which are stale, which to retry).

Heartbeats: the process that launched a trial records one for it every HEARTBEAT_S seconds; a RUNNING trial
without one for GRACE_S is failed and enqueued again (RetryHeartbeatStaleTrialCallback), so a sweep killed
at any point leaves nothing RUNNING once the same command runs again.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from ..config import Config
from ..schema import ConfigError

HEARTBEAT_S = 2
GRACE_S = 12
STORAGE_ENV = "IMGCLF_STUDY_STORAGE"
IDENTITY_ATTR = "imgclf.identity"

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# Our launcher records the heartbeats (runner._Heartbeat); ask/tell is what a sweep across processes needs.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_url(cfg: Config) -> str:
    """runtime.tracking.study_storage, else $IMGCLF_STUDY_STORAGE, else optuna.db beside the embedded mlflow.db
    (or in paths.mlflow_dir when tracking goes to a server)."""
    from ..layout import kept_by_the_checkout
    from ..tracking.store import tracking_uri

    url = cfg.runtime.tracking.study_storage or os.environ.get(STORAGE_ENV)
    if url:
        return url
    uri = tracking_uri(cfg.tracking)
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else \
        kept_by_the_checkout(cfg.paths.mlflow_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def study_name(cfg: Config) -> str:
    return cfg.sweep.study or f"{cfg.model_name}-{cfg.model.kind}"


def storage(url: str, heartbeat: bool = True) -> RDBStorage:
    """The study database; one that cannot be opened (damaged, not a database) is one line naming it."""
    import sqlalchemy.exc

    from ..urls import redact

    # SQLite serialises writers; several trial processes report at once, so wait for the lock, not 5 s.
    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    beat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback()} if heartbeat else {}
    try:
        return RDBStorage(url, engine_kwargs=kwargs, **beat)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{redact(url)}: not a study database Optuna can open ({first[:200]}); move it away to "
                         "start the study afresh") from None


def pruner(cfg: Config, max_epochs: int) -> optuna.pruners.BasePruner:
    s = cfg.sweep
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=s.warmup_epochs + 1)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def direction(cfg: Config) -> str:
    return "maximize" if cfg.sweep.metric == "val_acc" else "minimize"


def identity(cfg: Config, data: dict[str, str]) -> dict[str, Any]:
    """What the trials of a study depend on: the sweep's definition, the result settings it starts from and the
    prepared splits' hashes (a re-prepared ImageFolder has the same params but other images)."""
    return {"sweep": cfg.sweep.identity(), "params_digest": cfg.digest(), "direction": direction(cfg),
            "data_sha256": data}


def open_study(cfg: Config, url: str, name: str, max_epochs: int, data: dict[str, str]) -> optuna.Study:
    """Create the study, or load it when its identity matches this sweep's (else a one-line refusal)."""
    mine = identity(cfg, data)
    study = optuna.create_study(study_name=name, storage=storage(url), direction=direction(cfg),
                                sampler=optuna.samplers.TPESampler(seed=cfg.sweep.seed, constant_liar=True),
                                pruner=pruner(cfg, max_epochs), load_if_exists=True)
    recorded = study.user_attrs.get(IDENTITY_ATTR)
    mine = json.loads(json.dumps(mine))  # as stored: tuples become lists
    if recorded is None and not study.trials:
        study.set_user_attr(IDENTITY_ATTR, mine)
    elif recorded != mine:
        theirs, ours = _dotted(recorded or {}), _dotted(mine)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ConfigError(f"sweep.study: study {name!r} was made with other settings ({', '.join(differ)}); "
                          "restore them to go on with it, or name a new study in sweep.study")
    # A sampler seeded alike in every process replays its start-up draws after a resume: trial 6 would be trial 1
    # again. Seeded by sweep.seed and the trials already there instead: a new study starts from sweep.seed
    # itself, and each resume draws afresh, still the same for the same history.
    study.sampler = optuna.samplers.TPESampler(seed=(cfg.sweep.seed + 7_919 * len(study.trials)) % 2**32,
                                               constant_liar=True)
    return study


def _dotted(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
    return out


def load_for_trial(cfg: Config, url: str, name: str, max_epochs: int) -> optuna.Study:
    """The study as a trial's process sees it: the pruner to ask, no heartbeats (its launcher records them)."""
    return optuna.load_study(study_name=name, storage=storage(url, heartbeat=False), pruner=pruner(cfg, max_epochs))


def counts(trial: FrozenTrial) -> bool:
    """A trial that ended on its own: complete, pruned, or failed by its training (not by a lost process)."""
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def fail_stale(study: optuna.Study) -> list[FrozenTrial]:
    """Fail the RUNNING trials whose launcher stopped beating (each enqueued again); returns them."""
    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    fail_stale_trials(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in before]


def abandon(study: optuna.Study, trial_id: int) -> None:
    """A trial this process launched and will not finish (interrupted): failed and enqueued again at once."""
    store = study._storage
    try:
        if store.set_trial_state_values(trial_id, state=TrialState.FAIL):
            RetryHeartbeatStaleTrialCallback()(study, store.get_trial(trial_id))
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def retry_of(study: optuna.Study, trial_id: int) -> int | None:
    """The trial number a retried trial stands in for (RetryHeartbeatStaleTrialCallback's record)."""
    return study._storage.get_trial(trial_id).system_attrs.get("failed_trial")
