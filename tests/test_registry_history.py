"""The production history is a record a hand-made tag cannot bend: forged or damaged entries never move
production to a version that was not production, never turn a done move into an error, and the lock that
serializes moves can neither be predicted by another user nor hold a promote forever. A real embedded store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

import mlflow
from imgclf.registry import versions as registry

from .helpers import cli

pytestmark = pytest.mark.integration  # real servers, processes or stores: see conftest's layers


@pytest.fixture
def store(workdir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = mlflow.MlflowClient(uri, uri)
    client.create_registered_model("m")
    source = tmp_path / "model"
    source.mkdir()
    for _ in range(3):
        client.create_model_version("m", str(source))
    return uri, client


def _promote(*args: str, uri: str):
    return cli("promote", *args, "--set", f"runtime.tracking.uri={uri}", "--set", "register.model_name=m")


def test_a_forged_history_entry_never_picks_the_rollback_target(store):
    uri, client = store
    assert _promote("--version", "1", uri=uri).exit_code == 0
    assert _promote("--version", "2", uri=uri).exit_code == 0
    # An entry saying v3 was production (it never was), dated after every real move.
    forged = {"to": "3", "from": "2", "at": "2099-01-01T00:00:00Z", "by": "mallory", "action": "manual", "reason": "x"}
    client.set_registered_model_tag("m", f"{registry.HISTORY_ENTRY}{time.time_ns() * 10:020d}-ffffff", json.dumps(forged))
    res = _promote("--rollback", uri=uri)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["production"] == "1"
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"


def test_a_future_dated_entry_never_lets_a_second_rollback_go_forward(store):
    """After 1 → 2 and a rollback to 1, nothing before v1 was production: a hand-made entry dated after every
    real move ("v1 to v2") must not make a second rollback move production to v2."""
    uri, client = store
    for args in (("--version", "1"), ("--version", "2"), ("--rollback",)):
        assert _promote(*args, uri=uri).exit_code == 0
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"
    forged = {"to": "2", "from": "1", "at": "2099-01-01T00:00:00Z", "by": "mallory", "action": "promote", "reason": "x"}
    client.set_registered_model_tag("m", f"{registry.HISTORY_ENTRY}2099-01-01 00:00:00.000000 UTC v1 to v2",
                                    json.dumps(forged))
    # and one dated now-ish that no move wrote (the version's production.since says when v1 came back)
    client.set_registered_model_tag("m", f"{registry.HISTORY_ENTRY}9999 v1 to v2",
                                    json.dumps({**forged, "at": registry.utc_now()}))
    res = _promote("--rollback", uri=uri)
    assert res.exit_code != 0 and "no earlier production version" in res.stderr, res.output
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"


@pytest.mark.parametrize("damage", ["{not json", '{"to": "1"}', '["a list"]', '{"to": "x", "from": "none", "at": "", '
                                    '"by": "", "action": "manual", "reason": ""}'])
def test_a_damaged_entry_is_left_out_and_promote_still_succeeds(damage, store):
    uri, client = store
    assert _promote("--version", "1", uri=uri).exit_code == 0
    client.set_registered_model_tag("m", f"{registry.HISTORY_ENTRY}{time.time_ns():020d}-000000", damage)
    res = _promote("--version", "2", uri=uri)
    assert res.exit_code == 0 and json.loads(res.stdout)["production"] == "2", res.output
    back = _promote("--rollback", uri=uri)
    assert back.exit_code == 0 and json.loads(back.stdout)["production"] == "1", back.output
    assert [e["to"] for e in registry.history(client, "m")] == ["1", "2", "1"]


def test_a_reason_too_long_for_the_history_moves_nothing(store):
    uri, client = store
    assert _promote("--version", "1", uri=uri).exit_code == 0
    res = _promote("--version", "2", "--reason", "x" * 100_000, uri=uri)
    assert res.exit_code == 2 and "--reason: at most 1000 characters" in res.output, res.output
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"
    assert [e["to"] for e in registry.history(client, "m")] == ["1"]


def test_a_held_registry_lock_fails_promote_in_time_naming_it(store, monkeypatch):
    uri, client = store
    monkeypatch.setattr(registry, "LOCK_WAIT_S", 1.0)
    key_file = registry.lock_path(client, "m")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(key_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        res = _promote("--version", "1", uri=uri)
        assert res.exit_code == 1 and "held the registry lock" in res.stderr and str(key_file) in res.stderr
        assert time.perf_counter() - start < 15
    finally:
        holder.kill()
        holder.wait()
    assert _promote("--version", "1", uri=uri).exit_code == 0


def test_the_lock_folder_must_be_this_users_own(store, tmp_path, monkeypatch):
    uri, _ = store
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    planted = tmp_path / f"imgclf-{os.geteuid()}"
    planted.mkdir(mode=0o777)
    os.chmod(planted, 0o777)  # as another user would leave it for us
    res = _promote("--version", "1", uri=uri)
    assert res.exit_code == 1 and "not a private folder of this user" in res.stderr, res.output
    planted.rmdir()
    assert _promote("--version", "1", uri=uri).exit_code == 0
    assert oct((tmp_path / f"imgclf-{os.geteuid()}").stat().st_mode & 0o777) == "0o700"


def test_a_move_by_hand_is_done_even_when_the_prefect_server_is_down(store, monkeypatch, tmp_path):
    """`imgclf promote` tells the Prefect server (tests/test_triggers.py: the notification arrives); a server that
    can't be reached makes it say so on one line, and the move stands."""
    from .helpers import free_port

    uri, client = store
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    res = _promote("--version", "1", uri=uri)
    assert res.exit_code == 0 and "notification" not in json.loads(res.stdout), res.output  # no server: nothing to tell
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{free_port()}/api")
    res = _promote("--version", "2", uri=uri)
    assert res.exit_code == 0, res.output
    said = json.loads(res.stdout)["notification"]
    assert said.startswith("warning: production moved, but the Prefect server at http://127.0.0.1:"), said
    assert str(client.get_model_version_by_alias("m", "production").version) == "2"
