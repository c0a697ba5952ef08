"""Model registry: versions with aliases, a promotion gate, manual promote and rollback.

`production` is the alias serving uses; `challenger` marks the newest candidate.
Every move is written as tags on the version (who, when, why) and as one append-only
`production.history.<time>` tag on the registered model: that history is the record
rollback walks, and `production.history` summarises it for the MLflow UI.
Over 200 lines because the gate, the alias moves and the history they write are one
story: a reader checking what a promotion records needs all three side by side.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .locks import file_lock

log = logging.getLogger("imgclf")

PRODUCTION, CHALLENGER = "production", "challenger"
HISTORY_TAG = "production.history"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


class Incomparable(ValueError):
    """Production and the challenger classify different things (class lists or input shapes differ)."""


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    metric: str  # register.metric: what both scores are
    challenger_score: float
    production_version: Optional[str] = None
    production_score: Optional[float] = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def alias_version(client, name: str, alias: str) -> Optional[str]:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ensure_model(client, name: str, description: str = "") -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:  # created meanwhile by a concurrent run
            client.get_registered_model(name)


def find_version_for_run(client, name: str, run_id: str) -> Optional[str]:
    for mv in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        return mv.version
    return None


def register_version(client, name: str, model_uri: str, run_id: str, tags: dict[str, str],
                     description: str) -> tuple[str, bool]:
    """A new version (alias challenger) unless this run already has one; returns (version, created)."""
    ensure_model(client, name, "Image classifiers trained by the imgclf pipeline.")
    existing = find_version_for_run(client, name, run_id)
    if existing is not None:
        # A rerun after a kill between creating the version and moving the alias finishes the job.
        if alias_version(client, name, CHALLENGER) != str(existing):
            client.set_registered_model_alias(name, CHALLENGER, existing)
        return existing, False
    from .mlflow_internals import model_id_of

    model_id = model_id_of(model_uri)
    # The registry would resolve models:/m-<id> through MLflow's process-wide tracking URI (an MLflow TODO);
    # resolve it with this client instead, so no global state is needed.
    source = client.get_logged_model(model_id).artifact_location if model_id else model_uri
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description,
                                     model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv.version, True


HISTORY_ENTRY = HISTORY_TAG + "."  # one tag per move, never rewritten: production.history.<ns>-<random>


LOCK_WAIT_S = 60.0


def _lock_dir() -> Path:
    """A folder only this user can write: a lock at a name others can predict in /tmp could be taken (or
    pre-created) by another user to block every promote."""
    folder = Path(tempfile.gettempdir()) / f"imgclf-{os.geteuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RegistryError(f"{folder}: not a private folder of this user (owner uid {st.st_uid}, mode "
                            f"{oct(st.st_mode & 0o777)}); remove it and try again")
    return folder


def lock_path(client, name: str) -> Path:
    from .mlflow_internals import registry_uri

    key = hashlib.sha256(f"{registry_uri(client)}|{name}".encode()).hexdigest()[:16]
    return _lock_dir() / f"registry-{key}.lock"


@contextlib.contextmanager
def _serialized(client, name: str) -> Iterator[None]:
    """Moves of one model's production alias from this machine happen one at a time (read, then write)."""
    path = lock_path(client, name)
    try:
        with file_lock(path, timeout=LOCK_WAIT_S):
            yield
    except TimeoutError:
        raise RegistryError(f"{path}: another promote of {name!r} has held the registry lock for "
                            f"{LOCK_WAIT_S:.0f} s; try again when it is done") from None


HISTORY_KEYS = ("to", "from", "at", "by", "action", "reason")
ACTIONS = ("gate", "manual", "promote", "rollback")


def _entry(text: str) -> Optional[dict[str, str]]:
    """One history entry, or None when it is not one this project wrote (damaged, or hand-made)."""
    try:
        e = json.loads(text)
    except (ValueError, TypeError):
        return None
    if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in HISTORY_KEYS):
        return None
    if e["action"] not in ACTIONS or not e["to"].isdigit() or not (e["from"].isdigit() or e["from"] == "none"):
        return None
    return e


def history(client, name: str) -> list[dict[str, str]]:
    """Every production move, oldest first: the source of truth (one append-only tag per move, so two
    writers never overwrite each other's entries). Entries that are not well-formed are left out."""
    tags = client.get_registered_model(name).tags
    entries = (_entry(tags[k]) for k in sorted(k for k in tags if k.startswith(HISTORY_ENTRY)))
    return [e for e in entries if e is not None]


def production_stack(entries: list[dict[str, str]]) -> list[str]:
    """The versions production went through, a rollback undoing the move before it."""
    stack: list[str] = []
    for e in entries:
        if e["action"] == "rollback" and stack:
            stack.pop()
        if not stack or stack[-1] != e["to"]:
            stack.append(e["to"])
    return stack


def _was_production(client, name: str, version: str) -> bool:
    """Whether a move of this project put `version` in production (the tags _move writes on the version):
    a history entry alone, which anyone with write access to the model's tags can add, is not enough."""
    try:
        tags = client.get_model_version(name, version).tags
    except Exception:
        return False
    return "production.since" in tags and tags.get("production.action") in ACTIONS


def _move(client, name: str, version: str, reason: str, action: str) -> Optional[str]:
    try:
        client.get_model_version(name, version)
    except Exception:
        raise RegistryError(f"model {name!r} has no version {version}") from None
    previous = alias_version(client, name, PRODUCTION)
    client.set_registered_model_alias(name, PRODUCTION, version)
    who, when = getpass.getuser(), _now()
    for k, v in {"production.since": when, "production.by": who, "production.reason": reason,
                 "production.action": action, "production.previous": previous or "none"}.items():
        client.set_model_version_tag(name, version, k, v)
    if previous and previous != version:
        client.set_model_version_tag(name, previous, "production.until", when)
    entry = {"to": version, "from": previous or "none", "at": when, "by": who, "action": action, "reason": reason}
    client.set_registered_model_tag(name, f"{HISTORY_ENTRY}{time.time_ns():020d}-{os.urandom(3).hex()}",
                                    json.dumps(entry))
    # A readable summary for the UI, rebuilt from the entries (not the record itself); the move is done, so
    # a failure here must not turn it into an error.
    try:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history(client, name)[-20:])[:4900])
    except Exception as exc:
        log.warning("%s: production moved to v%s, but the history summary was not updated (%s)", name, version, exc)
    return previous


def move_production(client, name: str, version: str, reason: str, action: str = "promote") -> tuple[Optional[str], bool]:
    """Point `production` at `version`, record who/when/why; returns (version that held it, moved).

    Promoting the version already in production changes and records nothing."""
    with _serialized(client, name):
        current = alias_version(client, name, PRODUCTION)
        if current == str(version):
            return current, False
        return _move(client, name, str(version), reason, action), True


def rollback(client, name: str, reason: str = "rollback") -> tuple[str, str]:
    """Move `production` back to the last different version before it; repeated rollbacks walk further
    back. Returns (from, to)."""
    with _serialized(client, name):
        current = alias_version(client, name, PRODUCTION)
        if current is None:
            raise RegistryError(f"model {name!r} has no production version to roll back")
        stack = production_stack(history(client, name))
        if not stack or stack[-1] != current:  # moved outside the project: that move counts too
            stack.append(current)
        earlier = [v for v in stack[:-1] if v != current and _was_production(client, name, v)]
        if not earlier:
            raise RegistryError(f"model {name!r}: version {current} has no earlier production version")
        _move(client, name, earlier[-1], reason, "rollback")
        return current, earlier[-1]


def gate(client, name: str, version: str, metric: str, challenger_score: float, min_score: float,
         min_improvement: float, score_production: Callable[[str], float]) -> Decision:
    """Promote `version` when its `metric` reaches min_score and beats production's on the same test split.

    `score_production(model_uri)` scores the current production model with the scorer that scored the
    challenger, on the challenger's test split: numbers stored with production may come from other data.
    """
    prod = alias_version(client, name, PRODUCTION)
    decision = Decision(str(version), False, "", metric, challenger_score, prod)
    if prod == str(version):
        decision.promoted, decision.reason = True, f"version {version} is already production"
        return decision
    if challenger_score < min_score:
        decision.reason = f"{metric} {challenger_score:.4%} is below register.min_score {min_score:.4%}"
    elif prod is None:
        decision.promoted = True
        decision.reason = f"first model to pass register.min_score ({metric} {challenger_score:.4%} >= {min_score:.4%})"
    else:
        try:
            prod_score = score_production(f"models:/{name}/{prod}")
        except Incomparable as exc:
            decision.reason = (f"production v{prod} cannot be compared with this model ({exc}); registered, not "
                               "promoted: promote by hand if the new task is intended")
        except Exception as exc:
            decision.reason = (f"production version {prod} could not be scored on this test split "
                               f"({type(exc).__name__}: {str(exc)[:200]}); promote by hand if intended")
        else:
            decision.production_score = prod_score
            gain = challenger_score - prod_score
            if gain > 0 and gain >= min_improvement:
                decision.promoted = True
                decision.reason = (f"{metric} beats production v{prod} by {gain:+.4%} ({challenger_score:.4%} vs "
                                   f"{prod_score:.4%}; register.min_improvement {min_improvement:.4%})")
            else:
                decision.reason = (f"{metric} not better than production v{prod} by register.min_improvement "
                                   f"{min_improvement:.4%} ({challenger_score:.4%} vs {prod_score:.4%} on the same "
                                   "test split)")
    tags = {"gate.decision": "promoted" if decision.promoted else "rejected", "gate.reason": decision.reason,
            "gate.at": _now()}
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)
    if decision.promoted:
        move_production(client, name, str(version), decision.reason, action="gate")
    elif prod is not None:
        client.set_model_version_tag(name, prod, "gate.last_challenge",
                                     f"v{version} rejected at {tags['gate.at']}: {decision.reason}")
    return decision
