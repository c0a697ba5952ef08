"""Model registry: versions with aliases, a promotion gate, manual promote and rollback.

`production` is the alias serving uses; `challenger` marks the newest candidate.
Every move is written as tags on the version (who, when, why) and as one append-only
`production.history.<UTC time> v<from> to v<to>` tag on the registered model: that history is the
record rollback walks, one readable line per move in the MLflow UI.
The promotion gate, which decides when to move `production`, is in gate.py.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Iterator, Optional

from ..locks import file_lock, private_dir

log = logging.getLogger("imgclf")

PRODUCTION, CHALLENGER = "production", "challenger"
HISTORY_TAG = "production.history"


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # a history entry's `at` and a version's production.since


def utc_now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


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


TEST_SPLIT_TAG = "gate.test_split"  # the sha256 of the test split a gate decision was taken on


def decisions_on(client, test_split: str, name: str, version: str) -> tuple[int, int]:
    """(gate decisions, promotions) taken on the test split `test_split` by versions other than `version` of
    `name`, in every registered model of the store: each choice made on one split fits it a little more,
    whichever model it was for. Counted from the versions' tags, so it survives any restart of the server."""
    found, token = [], None
    while True:
        page = client.search_model_versions(f"tags.`{TEST_SPLIT_TAG}` = '{test_split}'", max_results=1000,
                                            page_token=token)
        found += [mv for mv in page if (mv.name, str(mv.version)) != (name, str(version))]
        token = page.token
        if not token:
            return len(found), sum(mv.tags.get("gate.decision") == "promoted" for mv in found)


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
    from ..tracking.mlflow_internals import model_id_of

    model_id = model_id_of(model_uri)
    # The registry would resolve models:/m-<id> through MLflow's process-wide tracking URI (an MLflow TODO);
    # resolve it with this client instead, so no global state is needed.
    source = client.get_logged_model(model_id).artifact_location if model_id else model_uri
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, description=description,
                                     model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv.version, True


HISTORY_ENTRY = HISTORY_TAG + "."  # one tag per move, never rewritten (see history_key)


LOCK_WAIT_S = 60.0


def lock_path(client, name: str) -> Path:
    from ..tracking.mlflow_internals import registry_uri

    key = hashlib.sha256(f"{registry_uri(client)}|{name}".encode()).hexdigest()[:16]
    return private_dir() / f"registry-{key}.lock"


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


CLOCK_SKEW_S = 600
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
    # utc_now's form only, and not later than now (give or take two machines' clocks): a move is never
    # recorded before it happens
    latest = time.strftime(TIME_FORMAT, time.gmtime(time.time() + CLOCK_SKEW_S))
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["at"]) or e["at"] > latest:
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


def _version_tags(client, name: str, version: str) -> dict[str, str]:
    try:
        return dict(client.get_model_version(name, version).tags)
    except Exception:
        return {}


def _was_production(client, name: str, version: str) -> bool:
    """Whether a move of this project put `version` in production (the tags _move writes on the version):
    a history entry alone, which anyone with write access to the model's tags can add, is not enough."""
    tags = _version_tags(client, name, version)
    return "production.since" in tags and tags.get("production.action") in ACTIONS


def _move(client, name: str, version: str, reason: str, action: str) -> Optional[str]:
    try:
        client.get_model_version(name, version)
    except Exception:
        raise RegistryError(f"model {name!r} has no version {version}") from None
    previous = alias_version(client, name, PRODUCTION)
    client.set_registered_model_alias(name, PRODUCTION, version)
    who, when = getpass.getuser(), utc_now()
    for k, v in {"production.since": when, "production.by": who, "production.reason": reason,
                 "production.action": action, "production.previous": previous or "none"}.items():
        client.set_model_version_tag(name, version, k, v)
    if previous and previous != version:
        client.set_model_version_tag(name, previous, "production.until", when)
    entry = {"to": version, "from": previous or "none", "at": when, "by": who, "action": action, "reason": reason}
    client.set_registered_model_tag(name, history_key(previous, version), json.dumps(entry))
    if HISTORY_TAG in client.get_registered_model(name).tags:  # the old summary repeated every entry
        with contextlib.suppress(Exception):
            client.delete_registered_model_tag(name, HISTORY_TAG)
    return previous


def history_key(previous: Optional[str], version: str) -> str:
    """`production.history.2026-11-30 14:05:12.123456 UTC v1 to v2`: one readable line per move, in time order."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return f"{HISTORY_ENTRY}{stamp} UTC {'v' + previous if previous else 'none'} to v{version}"


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
        entries = history(client, name)
        # The move that put the current version there wrote its `at` as the version's production.since at the
        # same instant: entries after it describe moves that did not happen (added by hand), so they are cut.
        since = _version_tags(client, name, current).get("production.since")
        last = max((i for i, e in enumerate(entries) if e["to"] == current and e["at"] == since), default=None)
        stack = production_stack(entries if last is None else entries[:last + 1])
        if not stack or stack[-1] != current:  # moved outside the project: that move counts too
            stack.append(current)
        earlier = [v for v in stack[:-1] if v != current and _was_production(client, name, v)]
        if not earlier:
            raise RegistryError(f"model {name!r}: version {current} has no earlier production version")
        _move(client, name, earlier[-1], reason, "rollback")
        return current, earlier[-1]
